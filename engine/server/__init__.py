"""kvpilot.engine.server: the OpenAI-compatible HTTP server and the load generator that measures it.

app.py routes and wiring; protocol.py/responses.py the OpenAI shapes; completions.py and chat.py the
endpoints over generate.py, streams.py and deltas.py; errors.py the error shape; metrics.py Prometheus;
lifecycle.py readiness and drain; middleware.py API key and body limit;
cli.py `kvpilot serve`. loadgen.py, workloads.py and bench_cli.py (`kvpilot bench serve`) import
neither torch nor the engine, so the tuner and the operator can drive load in-process.
"""

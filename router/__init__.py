"""kvpilot.router: a prefix-cache-aware reverse proxy in front of kvpilot engines. It never imports torch.

config.py the knobs (flags derive from it); keys.py a request's block names from its token ids
(tokenizer.py loads the model's tokenizer and chat template without torch); index.py which engine holds
which block, from the engines' /kv/events (feeds.py), which also read their load from /metrics;
picker.py the pure choice of an engine; pool.py the current backends, swapped atomically from a
discovery source (discovery.py: a static list, or Kubernetes); admission.py the bounded queue;
proxy.py forwarding with retries before the first byte; app.py routes; metrics.py its Prometheus series.
"""

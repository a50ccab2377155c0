"""End-to-end harness: the real operator, real engine processes, a real Prometheus, no Docker.

kmock's Kubernetes emulator is the API server; `node` plays kubelet and the Deployment controller,
`proxy` plays kube-proxy, and `scenarios` drive InferenceServices through it while `traffic` keeps
streaming requests through the stable Service. Run with `python -m e2e`.
"""

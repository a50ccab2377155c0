"""Pure desired-state builders: revisions, the engine's command line, volumes, probes, Services."""

from __future__ import annotations

from kvpilot.operator import resources as res
from kvpilot.operator.apply import taken_over
from kvpilot.operator.spec import parse_spec

from .conftest import BASE_SPEC


def spec(**overrides):
    raw = {**BASE_SPEC, **overrides}
    return parse_spec(raw)


def test_revision_follows_the_pod_template_inputs_only():
    base = res.revision_of(spec())
    assert base == res.revision_of(spec()) and len(base) == 10
    assert res.revision_of(spec(model={**BASE_SPEC["model"], "revision": "r2"})) != base
    assert res.revision_of(spec(engine={**BASE_SPEC["engine"], "maxNumSeqs": 8})) != base
    assert res.revision_of(spec(engine={**BASE_SPEC["engine"], "image": "other:1"})) != base
    # A knob set to the engine's default is the configuration the engine runs anyway.
    assert res.revision_of(spec(engine={**BASE_SPEC["engine"], "maxNumSeqs": 256, "tensorParallelSize": 1})) == base
    # Scaling, SLOs and rollout settings are not a new revision.
    assert res.revision_of(spec(replicas=3)) == base
    assert res.revision_of(spec(slo={"ttftP95Ms": 100})) == base
    assert res.revision_of(spec(rollout={"readyTimeoutSeconds": 99})) == base


def test_engine_command_line_carries_every_knob():
    s = spec(
        engine={
            "maxModelLen": 2048,
            "enablePrefixCaching": False,
            "extraArgs": ["--seed", "1"],
            "gpuMemoryUtilization": 0.8,
            "maxNumSeqs": 64,
            "maxNumBatchedTokens": 2048,
        }
    )
    args = res.engine_args(s, "abc", "/m")
    pairs = dict(a.split("=", 1) for a in args[:-2] if "=" in a)
    assert pairs["--model"] == "/m" and pairs["--served-model-name"] == "demo" and pairs["--revision"] == "abc"
    assert pairs["--gpu-memory-utilization"] == "0.8" and pairs["--max-num-seqs"] == "64"
    assert pairs["--max-num-batched-tokens"] == "2048" and pairs["--max-model-len"] == "2048"
    assert "--tensor-parallel-size" not in pairs  # unset: the engine's default
    assert "--no-enable-prefix-caching" in args and args[-2:] == ["--seed", "1"]


def test_gpu_pod_on_a_pvc_model():
    s = spec(
        model={"name": "llama", "uri": "pvc://models/llama-8b"},
        resources={"gpusPerReplica": 2, "cpu": 8, "memory": "64Gi", "shmSize": "16Gi"},
        engine={"tensorParallelSize": 2, "drainTimeoutSeconds": 30, "apiKeySecret": "llm-key"},
    )
    pod = res.pod_template("llm", s, "rev1")["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"]["cpu"] == "8"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert "--model=/mnt/model/llama-8b" in container["args"]
    assert pod["terminationGracePeriodSeconds"] > 30 + res.PRESTOP_SLEEP_SECONDS
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(res.PRESTOP_SLEEP_SECONDS)]
    env = {e["name"]: e for e in container["env"]}
    assert env["KVPILOT_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "llm-key", "key": "api-key"}
    assert env["OMP_NUM_THREADS"]["value"] == "8"


def test_hostpath_and_image_directory_models():
    host = res.pod_template("a", spec(model={"name": "m", "uri": "hostpath:///data/m"}), "r")["spec"]
    assert next(v for v in host["volumes"] if v["name"] == "model")["hostPath"]["path"] == "/data/m"
    image = res.pod_template("a", spec(model={"name": "m", "uri": "/opt/models/m"}), "r")["spec"]
    assert [v["name"] for v in image["volumes"]] == ["dshm", "tmp"]
    assert image["containers"][0]["args"][0] == "--model=/opt/models/m"


def test_services_select_by_revision_and_monitoring_switches():
    children = res.shared_children("llm", "ns", "bbb", service_monitors=True)
    by_name = {(c["kind"], c["metadata"]["name"]): c for c in children}
    assert ("Service", "llm") not in by_name, "the stable Service is the routers' (router_resources.py)"
    assert by_name[("Service", "llm-preview")]["spec"]["selector"]["kvpilot.dev/revision"] == "bbb"
    assert "kvpilot.dev/revision" not in by_name[("Service", "llm-metrics")]["spec"]["selector"]
    assert ("ServiceMonitor", "llm") in by_name
    assert by_name[("Service", "llm-metrics")]["metadata"]["annotations"] == {}
    plain = res.shared_children("llm", "ns", "aaa", service_monitors=False)
    assert not any(c["kind"] == "ServiceMonitor" for c in plain)


def test_deployment_readiness_needs_the_current_generation():
    dep = res.deployment("llm", "ns", spec(replicas=2), "r")
    dep["metadata"]["generation"] = 2
    assert not res.deployment_ready(dep)
    dep["status"] = {"observedGeneration": 1, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}
    assert not res.deployment_ready(dep)
    dep["status"]["observedGeneration"] = 2
    assert res.deployment_ready(dep)
    dep["status"]["availableReplicas"] = 1
    assert not res.deployment_ready(dep)


def test_drift_is_a_field_of_ours_that_another_manager_owns():
    desired = {"metadata": {"annotations": {"a": "1"}}, "spec": {"selector": {"rev": "x"}, "ports": [
        {"name": "http", "port": 8000}]}}

    def live(manager: str, fields: dict) -> dict:
        return {"metadata": {"managedFields": [
            {"manager": "kvpilot", "operation": "Apply", "fieldsV1": {"f:spec": {"f:selector": {}}}},
            {"manager": manager, "operation": "Update", "fieldsV1": fields}]}}

    assert taken_over(live("kubectl-edit", {"f:spec": {"f:selector": {"f:rev": {}}}}), desired) == ["kubectl-edit"]
    assert taken_over(live("edit", {"f:spec": {"f:ports": {'k:{"name":"http"}': {"f:port": {}}}}}), desired)
    # The Deployment controller's own annotation, and a status writer, are no drift of ours.
    assert not taken_over(live("kube-controller-manager", {"f:metadata": {"f:annotations": {"f:rev": {}}}}), desired)
    status_writer = live("kubelet", {"f:spec": {"f:selector": {"f:rev": {}}}})
    status_writer["metadata"]["managedFields"][1]["subresource"] = "status"
    assert not taken_over(status_writer, desired)


def test_cpu_threads_round_a_request_up_to_whole_cpus():
    assert [res.cpu_threads(q) for q in ("500m", "1", 2, "2.5", "1500m")] == [1, 1, 2, 3, 2]

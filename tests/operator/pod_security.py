"""The Kubernetes Pod Security Standards' "restricted" profile, written out from the documentation
(https://kubernetes.io/docs/concepts/security/pod-security-standards/, v1.32): the baseline controls and the
restricted ones, checked on a pod spec. Returns one line per violation, naming the field."""

from __future__ import annotations

from typing import Any

# Baseline: capabilities a container may add; restricted narrows that to NET_BIND_SERVICE.
RESTRICTED_ADD = {"NET_BIND_SERVICE"}
# Restricted: the only volume types allowed.
VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def _containers(pod: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"spec.{kind}[{c.get('name')}]", c) for kind in ("initContainers", "containers", "ephemeralContainers")
            for c in pod.get(kind) or []]


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """`pod` is a PodSpec. An empty list means it meets the restricted profile (which includes baseline)."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    # --- baseline ---
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"spec.{field} must be unset or false")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("spec.securityContext.windowsOptions.hostProcess must be false")
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            out.append(f"spec.volumes[{volume['name']}]: hostPath volumes are forbidden")
    if (psc.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
        out.append("spec.securityContext.seLinuxOptions.type is not allowed")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"spec.securityContext.sysctls: {sysctl.get('name')} is not a safe sysctl")
    if (psc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        out.append("spec.securityContext.appArmorProfile.type must be RuntimeDefault or Localhost")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    # --- restricted, pod level ---
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= VOLUME_TYPES:
            out.append(f"spec.volumes[{volume['name']}]: type {sorted(kinds)} not allowed (restricted)")
    if psc.get("runAsUser") == 0:
        out.append("spec.securityContext.runAsUser must not be 0")
    for path, c in _containers(pod):
        sc = c.get("securityContext") or {}
        # baseline
        if sc.get("privileged"):
            out.append(f"{path}.securityContext.privileged must be false")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{path}.securityContext.windowsOptions.hostProcess must be false")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{path}.ports: hostPort must be unset or 0")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{path}.securityContext.procMount must be Default")
        if (sc.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
            out.append(f"{path}.securityContext.seLinuxOptions.type is not allowed")
        if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"{path}.securityContext.appArmorProfile.type must be RuntimeDefault or Localhost")
        # restricted
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{path}.securityContext.allowPrivilegeEscalation must be false")
        if not (sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot")
                                                    is not False)):
            out.append(f"{path}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"{path}.securityContext.runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{path}: seccompProfile.type must be RuntimeDefault or Localhost (pod or container)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{path}.securityContext.capabilities.drop must include ALL")
        if set(caps.get("add") or []) - RESTRICTED_ADD:
            out.append(f"{path}.securityContext.capabilities.add may only hold NET_BIND_SERVICE")
    return out

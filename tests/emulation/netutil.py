"""Helpers for the testbed's root-only tests: why they cannot run here, and a snapshot of what exists."""

from __future__ import annotations

import os
import shutil
import subprocess

from emulation.cgroups import cgroup_parents, cgroup_version


def why_no_netns() -> str | None:
    """Why namespaces, veths and tc cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2's `{tool}`"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"`ip netns` is unavailable: {r.stderr.strip()}"
    return None


def why_no_cgroups() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make cgroups"
    if cgroup_version() is None:
        return "no cgroup memory controller mounted under /sys/fs/cgroup"
    return None


def snapshot() -> dict[str, list[str]]:
    """Namespaces, host links and cgroup directories (next to ours) that exist now."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
    return {
        "netns": sorted(ln.split()[0] for ln in ns.splitlines() if ln.strip()),
        "links": sorted(ln.split(":")[1].strip() for ln in links.splitlines() if ln.strip()),
        "cgroups": sorted(str(p) for parent in cgroup_parents() if parent.is_dir() for p in parent.iterdir()
                          if p.is_dir()),
    }


def mine(snap: dict[str, list[str]], prefix: str) -> dict[str, list[str]]:
    """Only the entries that carry a run's prefix (other helpers may create their own meanwhile)."""
    return {k: [v for v in vs if prefix in v] for k, vs in snap.items()}

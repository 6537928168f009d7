"""Specs and candidates shared by the GCP and Azure provider tests."""

from __future__ import annotations

from typing import Any

from orchestrator.config import Candidate, PoolConfig
from orchestrator.providers.base import LaunchSpec, managed_tags, vm_name

ORCH_ID = "orch-test"
PROJECT = "test-project"
ZONE = "us-central1-a"
GCE_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu124"
AZ_IMAGE = "Canonical:ubuntu-24_04-lts:server:latest"
USER_DATA = "#cloud-config\nruncmd: [echo hi]\n"


def gcp_candidate(**kw: Any) -> Candidate:
    kw.setdefault("cloud", "gcp")
    kw.setdefault("zone", ZONE)
    kw.setdefault("instance_type", "n1-standard-4")
    kw.setdefault("image", GCE_IMAGE)
    kw.setdefault("gpu", {"type": "nvidia-tesla-t4", "count": 1})
    return Candidate(**kw)


def azure_candidate(**kw: Any) -> Candidate:
    kw.setdefault("cloud", "azure")
    kw.setdefault("location", "eastus")
    kw.setdefault("instance_type", "Standard_NC4as_T4_v3")
    kw.setdefault("image", AZ_IMAGE)
    return Candidate(**kw)


def make_spec(cand: Candidate, launch_key: str = "1001-1-1", *, orchestrator_id: str = ORCH_ID,
              pool_name: str = "gpu-t4", **pool: Any) -> LaunchSpec:
    pool_cfg = PoolConfig(name=pool_name, labels=[pool_name], candidates=[cand], **pool)
    name = vm_name(orchestrator_id, pool_cfg.name, launch_key)
    return LaunchSpec(name=name, launch_key=launch_key, candidate=cand, pool=pool_cfg,
                      user_data=USER_DATA, tags=managed_tags(orchestrator_id, pool_cfg.name, name))

"""The launch recipes load and agree with the cluster search space."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from sweeper.space import load_space

RECIPES = Path(__file__).resolve().parents[2] / "sweeper" / "recipes"


def _load(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text())


def test_cluster_launcher_yaml_has_the_required_fields(root: Path) -> None:
    config = _load("cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, key
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node in types.items():
        assert {"node_config", "resources", "min_workers", "max_workers"} <= set(node), name
        assert node["min_workers"] <= node["max_workers"]
    assert types["gpu_node"]["resources"]["GPU"] >= 1
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_cluster_space_asks_for_what_the_cpu_nodes_offer(root: Path) -> None:
    types = _load("cluster.yaml")["available_node_types"]
    space = load_space(root / "search_spaces" / "cluster.yaml")
    for backend in space.backends:
        target = space.target_of(backend)
        fitting = [
            name for name, node in types.items()
            if all(node["resources"].get(r, 0) >= amount for r, amount in target.resources.items())
            and node["resources"].get("CPU", 0) >= target.num_cpus
            and all(node.get("labels", {}).get(k) == v for k, v in target.labels.items())
        ]
        assert fitting, f"no node type can run {backend}'s target"


def test_rayjob_manifest(root: Path) -> None:
    job = _load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
    assert "headGroupSpec" in spec["rayClusterSpec"] and spec["rayClusterSpec"]["workerGroupSpecs"]
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["sweeper", "run"] and "--address" in args
    assert (root / args[2]).is_file(), "the entrypoint's space file is in the project"
    load_space(root / args[2])
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["image"]


def test_readme_job_submit_recipe_names_a_real_space(root: Path) -> None:
    readme = (root / "README.md").read_text()
    line = next(l for l in readme.splitlines() if l.startswith("ray job submit"))
    args = shlex.split(line.rstrip("\\"))
    assert "--working-dir" in args and "--" in args
    entry = args[args.index("--") + 1 :]
    assert entry[:2] == ["sweeper", "run"] and (root / entry[2]).is_file()

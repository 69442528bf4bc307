"""The accelerate config files in launch/ parse and say what their comments promise."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

LAUNCH = Path(__file__).resolve().parent.parent / "launch"

EXPECTED = {
    "cpu.yaml": ("NO", 1, 1, True),
    "cpu_multi_process.yaml": ("MULTI_GPU", 2, 1, False),  # + ACCELERATE_USE_CPU=1: gloo processes
    "one_gpu.yaml": ("NO", 1, 1, False),
    "multi_gpu.yaml": ("MULTI_GPU", 8, 1, False),
    "multi_node.yaml": ("MULTI_GPU", 16, 2, False),
    "multi_node_c10d.yaml": ("MULTI_GPU", 16, 2, False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config(name):
    cfg = load_config_from_file(str(LAUNCH / name))
    assert (cfg.distributed_type.value, cfg.num_processes, cfg.num_machines, cfg.use_cpu) == EXPECTED[name]
    assert cfg.mixed_precision == "no"  # precision comes from the flowerdist config


def test_every_launch_file_is_covered():
    assert {p.name for p in LAUNCH.glob("*.yaml")} == set(EXPECTED)

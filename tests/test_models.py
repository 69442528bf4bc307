"""Model zoo: shapes, gradients, parameter counts, torchvision parity, timm loading (CPU, no mocks)."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from flowerdist.errors import FlowerdistError
from flowerdist.models import create_model, list_models, register_model

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
SCRATCH = [name for name in list_models() if not name.startswith("timm/")]  # every registered model, as timm's tests do
TORCHVISION_B_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny inputs: per-op overhead dominates, and a second thread only spins on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(name: str, **kwargs) -> torch.nn.Module:
    """Structure only: no memory, no init time (counts and names are exact)."""
    with torch.device("meta"):
        return create_model(name, init_weights=False, **kwargs)


def test_flowerdist_models_lists_every_model_and_how_to_name_a_timm_one():
    from conftest import run_cli

    lines = run_cli("models").stdout.splitlines()
    assert lines == list_models() and set(RESNETS + ["seed_resnet"]) <= set(lines)
    timm_lines = [line for line in lines if line.startswith("timm/")]
    assert timm_lines and all(create_model(name, 5, image_size=32) for name in lines if not name.startswith("timm/"))


# every registered model with every shortcut it takes (seed_resnet has none)
CASES = [(name, s) for name in SCRATCH for s in (("B",) if name == "seed_resnet" else ("A", "B", "C", "none"))]


@pytest.mark.parametrize("name, shortcut", CASES)
def test_forward_backward_every_parameter_gets_a_gradient(name, shortcut):
    torch.manual_seed(0)
    # init_weights=False: this checks structure; seed_resnet ignores shortcut
    model = create_model(name, 5, shortcut=shortcut, image_size=32, init_weights=False)
    out = model(torch.randn(2, 3, 32, 32))  # 1x1 after layer4: small, still exercises every stride
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", RESNETS)
def test_param_counts_b_matches_torchvision_and_a_lt_b_lt_c(name):
    counts = {s: n_params(on_meta(name, num_classes=1000, shortcut=s)) for s in "ABC"}
    assert counts["B"] == TORCHVISION_B_PARAMS[name]
    assert counts["A"] < counts["B"] < counts["C"]


@pytest.mark.parametrize("name", RESNETS)
def test_shortcut_a_is_parameter_free_and_c_projects_every_block(name):
    a, c = on_meta(name, shortcut="A"), on_meta(name, shortcut="C")
    assert not [n for n, _ in a.named_parameters() if "downsample" in n]
    blocks = [blk for layer in (c.layer1, c.layer2, c.layer3, c.layer4) for blk in layer]
    projections = [blk.downsample[0] if isinstance(blk.downsample, torch.nn.Sequential) else None for blk in blocks]
    assert all(isinstance(p, torch.nn.Conv2d) and p.kernel_size == (1, 1) for p in projections)


def test_registry_reads_the_entry_points_own_signature():
    from flowerdist.models import registry

    @register_model
    def _test_any_module(num_classes: int = 5, image_size: int = 224) -> torch.nn.Module:  # annotated nn.Module: fine
        return torch.nn.Linear(image_size, num_classes)

    @register_model
    def _test_kwargs(**kwargs):  # no annotation, takes everything
        return torch.nn.Linear(kwargs["image_size"], kwargs["num_classes"])

    try:
        assert create_model("_test_any_module", num_classes=7, image_size=3).out_features == 7
        model = create_model("_test_kwargs", num_classes=7, image_size=3, shortcut="C")
        assert (model.in_features, model.out_features) == (3, 7)
        with pytest.raises(TypeError, match="must accept num_classes"):
            register_model(lambda image_size=3: torch.nn.Identity())
    finally:
        for name in ("_test_any_module", "_test_kwargs"):
            registry._ENTRYPOINTS.pop(name, None)
            registry._OPTIONS.pop(name, None)


def test_bad_shortcut_names_the_key():
    with pytest.raises(FlowerdistError, match="model.shortcut"):
        create_model("resnet18", shortcut="D")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_b_equals_torchvision_logits(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)().eval()
    model = create_model(name, 1000, init_weights=False).eval()
    model.load_state_dict(reference.state_dict())  # strict
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["resnet34", "resnet101", "resnet152"])
def test_b_state_dict_keys_and_shapes_match_torchvision(name):
    with torch.device("meta"):
        reference = getattr(torchvision.models, name)()
    ours = {k: v.shape for k, v in on_meta(name, num_classes=1000).state_dict().items()}
    assert ours == {k: v.shape for k, v in reference.state_dict().items()}


def test_timm_like_interface():
    model = create_model("resnet18", 5).eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, 512, 2, 2)
    assert model.forward_head(features, pre_logits=True).shape == (2, 512)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).shape == (2, 3)
    seed = create_model("seed_resnet", 5, image_size=64)
    seed.reset_classifier(7)
    assert seed(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_zero_init_last_is_off_by_default():
    from flowerdist.models.resnet import resnet50

    on = resnet50(zero_init_last=True)
    assert all(blk.bn3.weight.abs().sum() == 0 for blk in on.layer1)
    assert all(blk.bn3.weight.abs().sum() > 0 for blk in create_model("resnet50").layer1)


def test_scratch_model_rejects_pretrained():
    with pytest.raises(FlowerdistError, match="timm"):
        create_model("resnet50", pretrained=True)


def test_unknown_scratch_name_suggests_closest():
    with pytest.raises(FlowerdistError, match="resnet18"):
        create_model("resnet19")


# --- seed_resnet -----------------------------------------------------------------------------------


def test_seed_resnet_is_the_tutorial_network():
    model = create_model("seed_resnet", 5, image_size=224)
    assert model.fc.in_features == 43_740
    assert n_params(model) == 258_735
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 5)


@pytest.mark.parametrize("size", [128, 96])
def test_seed_resnet_other_image_sizes(size):
    model = create_model("seed_resnet", 5, image_size=size)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 5)


def test_seed_resnet_too_small_names_data_image_size():
    with pytest.raises(FlowerdistError, match=r"data\.image_size.*12"):
        create_model("seed_resnet", image_size=11)
    assert create_model("seed_resnet", image_size=12)(torch.randn(1, 3, 12, 12)).shape == (1, 5)


def test_seed_resnet_init_weights_changes_the_init():
    torch.manual_seed(0)
    default = create_model("seed_resnet", init_weights=False)
    torch.manual_seed(0)
    kaiming = create_model("seed_resnet", init_weights=True)
    assert default.conv1.bias.abs().sum() > 0 and kaiming.conv1.bias.abs().sum() == 0
    fan_out = 20 * 5 * 5
    assert abs(kaiming.conv1.weight.std().item() - (2 / fan_out) ** 0.5) < 0.01
    assert not torch.equal(default.conv1.weight, kaiming.conv1.weight)


# --- timm ------------------------------------------------------------------------------------------


def test_timm_model_builds_with_num_classes():
    model = create_model("timm/resnet18", 5)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A 1000-class timm resnet18 saved both ways, standing in for downloaded weights."""
    folder = tmp_path_factory.mktemp("weights")
    state = timm.create_model("resnet18").state_dict()
    save_file(state, folder / "resnet18.safetensors")
    torch.save(state, folder / "resnet18.pth")
    return folder, state


@pytest.mark.parametrize("filename", ["resnet18.safetensors", "resnet18.pth"])
def test_timm_pretrained_file_loads_backbone_and_new_head(timm_weights, filename):
    folder, state = timm_weights
    model = create_model("timm/resnet18", 5, pretrained=True, pretrained_file=str(folder / filename))
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 5


def test_timm_pretrained_file_missing_names_the_key(tmp_path):
    with pytest.raises(FlowerdistError, match=r"model\.pretrained_file"):
        create_model("timm/resnet18", pretrained=True, pretrained_file=str(tmp_path / "nope.safetensors"))


def test_timm_pretrained_file_for_another_architecture(timm_weights):
    with pytest.raises(FlowerdistError, match=r"model\.pretrained_file"):
        create_model("timm/resnet34", pretrained=True, pretrained_file=str(timm_weights[0] / "resnet18.pth"))


def test_timm_pretrained_offline_without_the_weights_fails_fast(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE set (as the tests set it) and weights not in the cache: flowerdist's one line, whether or not
    this machine has a network (the hub's own error would be a traceback)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(FlowerdistError, match=r"HF_HUB_OFFLINE is set: set model\.pretrained_file"):
        create_model("timm/resnet18", pretrained=True)
    assert time.monotonic() - start < 5


def test_timm_pretrained_with_the_hub_unreachable_fails_fast(monkeypatch, tmp_path):
    """Online mode and a hub that does not answer (here a closed local port stands in for a machine without
    network): a short probe, then one line; not timm's 46 s of retries."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "ENDPOINT", "https://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(FlowerdistError, match=r"127\.0\.0\.1 is unreachable: set model\.pretrained_file"):
        create_model("timm/resnet18", pretrained=True)
    assert time.monotonic() - start < 10


def test_timm_pretrained_from_local_hf_cache_is_offline(timm_weights, tmp_path):
    """Weights laid out as the HF hub cache holds them load with no file given and no network."""
    snapshot = tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(timm_weights[0] / "resnet18.safetensors")
    (tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0" * 40)
    script = textwrap.dedent(
        """
        import torch
        from safetensors.torch import load_file
        from flowerdist.models import create_model
        model = create_model("timm/resnet18", 5, pretrained=True)
        expected = load_file(r"{weights}")["conv1.weight"]
        assert torch.equal(model.conv1.weight, expected) and model.fc.out_features == 5
        """
    ).format(weights=timm_weights[0] / "resnet18.safetensors")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    env["HF_HOME"] = str(tmp_path)  # a fresh process, so huggingface_hub reads this cache
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_timm_unknown_name_suggests_closest():
    with pytest.raises(FlowerdistError, match="timm/resnet50"):
        create_model("timm/resnt50")

"""Training ingredients from the libraries (augmentation, MixUp/CutMix, EMA, weight-decay groups, plain
networks): each keeps the pixels a step sees a function of (seed, epoch, sample) only."""

from __future__ import annotations

import pytest
import torch

from flowerdist.config import AugmentConfig, OptimConfig, load_config
from flowerdist.data.dataset import FlowerDataset
from flowerdist.data.folder import scan_folder
from flowerdist.data.loader import make_loader
from flowerdist.data.sampler import ShardedSampler
from flowerdist.data.transforms import train_transform
from flowerdist.errors import FlowerdistError
from flowerdist.mix import GlobalBatchMix, build_mix
from flowerdist.models import create_model
from flowerdist.optim import build_optimizer

EVERYTHING = AugmentConfig(color_jitter=0.4, auto_augment="randaugment", random_erasing=0.5, mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.8)


def pixels_by_index(dataset, sampler, workers):
    out = {}
    for images, _, indices in make_loader(dataset, sampler, 4, workers, torch.device("cpu")):
        out.update({int(i): img for i, img in zip(indices, images)})
    return out


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_pixels_do_not_depend_on_world_size_workers_or_resume(tiny_data, policy):
    augment = AugmentConfig(color_jitter=0.4, auto_augment=policy, random_erasing=0.5)
    index = scan_folder(tiny_data)
    dataset = FlowerDataset(index, train_transform(48, 0.35, augment), seed=7)
    indices = list(range(0, len(index), 3))

    def sampler(rank, world, start=0):
        s = ShardedSampler(indices, 4, rank, world, seed=7)
        s.set_epoch(2, start_sample=start)
        return s

    one = pixels_by_index(dataset, sampler(0, 1), workers=0)
    two = {**pixels_by_index(dataset, sampler(0, 2), workers=2), **pixels_by_index(dataset, sampler(1, 2), workers=1)}
    resumed = pixels_by_index(dataset, sampler(0, 1, start=24), workers=2)  # a resume 24 samples into the epoch
    assert one.keys() == two.keys() and set(resumed) < set(one)
    assert all(torch.equal(one[i], two[i]) for i in one)
    assert all(torch.equal(one[i], resumed[i]) for i in resumed)
    # ...and the augmentation did something: another epoch gives other pixels
    other = FlowerDataset(index, train_transform(48, 0.35, augment), seed=7)
    assert sum(not torch.equal(other[(3, i)][0], one[i]) for i in one) > 0.9 * len(one)


def test_random_erasing_fills_uint8_noise():
    from flowerdist.data.transforms import RandomErasing

    torch.manual_seed(0)
    image = torch.full((3, 32, 32), 100, dtype=torch.uint8)
    erased = RandomErasing(p=1.0, value="random")(image)
    changed = erased != 100
    assert erased.dtype == torch.uint8 and 0.02 < changed.float().mean() < 0.5
    assert erased[changed].float().std() > 50  # uniform noise over 0-255, not torchvision's wrapped 0/1/255


class OneRank:
    num_processes, process_index = 1, 0


def test_mix_is_seeded_by_step_and_pairs_each_sample_with_the_one_before():
    mix = build_mix(AugmentConfig(mixup_alpha=0.4), 5, seed=3, accelerator=OneRank())
    assert isinstance(mix, GlobalBatchMix)
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    a, ta = mix(images, labels, step=5)
    b, tb = build_mix(AugmentConfig(mixup_alpha=0.4), 5, seed=3, accelerator=OneRank())(images, labels, step=5)
    assert torch.equal(a, b) and torch.equal(ta, tb)  # (seed, step) decide
    lam = ta[1, 1].item()  # sample 1 = lam * sample 1 + (1 - lam) * sample 0
    assert a[1, 0, 0, 0].item() == pytest.approx(lam * 1 + (1 - lam) * 0)
    assert a[0, 0, 0, 0].item() == pytest.approx(lam * 0 + (1 - lam) * 3)  # sample 0 pairs with the last (wraps)
    assert ta.sum(1).tolist() == pytest.approx([1.0] * 4)
    c, _ = mix(images, labels, step=5)  # the next micro-step of the same optimizer step draws anew
    d, _ = mix(images, labels, step=6)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert build_mix(AugmentConfig(), 5, 3, OneRank())(images, labels, 0)[1] is labels  # off: integer labels pass


def test_weight_decay_groups_honour_no_weight_decay():
    class WithEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 8))  # 3-D: the old ndim rule decayed it
            self.proj = torch.nn.Linear(8, 8)

        def no_weight_decay(self):
            return {"pos_embed"}

    opt = build_optimizer(WithEmbedding(), OptimConfig(weight_decay=0.1), 1e-3)
    decayed = [p.shape for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed == [torch.Size([8, 8])]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_plain_network_has_no_shortcut(name):
    plain = create_model(name, 5, shortcut="none")
    residual = create_model(name, 5, shortcut="B")
    assert not [n for n, _ in plain.named_modules() if n.endswith("downsample")]
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in residual.parameters())  # no projections
    for model in (plain, residual):  # zero every block's last conv: a shortcut still carries the input through
        for block in [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]:
            last = block.conv3 if hasattr(block, "conv3") else block.conv2
            torch.nn.init.zeros_(last.weight)
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        assert plain.eval().layer1(x).abs().max() == 0  # relu(bn(0)) with bn bias 0: nothing gets through
        assert residual.eval().layer1(x).abs().max() > 0


@pytest.mark.parametrize(
    "override, needle",
    [
        ("augment.mix_prob=1.5", "augment.mix_prob' must lie in [0, 1]"),
        ("augment.auto_augment=autoaugment", "must be one of none, randaugment, trivialaugment"),
        ("train.ema_decay=1.0", "train.ema_decay' must lie in [0, 1)"),
        ("train.best_of=ema", "train.best_of=ema needs an EMA"),
        ("model.shortcut=D", "one of A, B, C, none"),
    ],
)
def test_new_keys_refuse_bad_values_in_one_line(override, needle):
    with pytest.raises(FlowerdistError, match=None) as err:
        load_config(None, [override])
    assert needle in str(err.value) and "\n" not in str(err.value)

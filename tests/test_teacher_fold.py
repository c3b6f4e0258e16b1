"""core.models.inference.fold_batchnorm: stage one's teachers with BatchNorm folded into their convolutions
compute the same outputs with fewer kernels; models it cannot rewrite are used as they are."""
from __future__ import annotations

import torch
import torchvision

from mealkd.core.models.inference import fold_batchnorm


def with_trained_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Random running statistics and affine parameters, so a wrong fold shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def batchnorms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_resnet_is_folded_and_computes_the_same_probabilities():
    torch.manual_seed(0)
    model = with_trained_statistics(torchvision.models.resnet18(num_classes=7))
    folded, done = fold_batchnorm(model, 32)
    assert done and folded is not model
    assert batchnorms(model) == 20 and batchnorms(folded) == 0
    x = torch.randn(4, 3, 48, 40)  # another size and batch than the check's
    with torch.inference_mode():
        diff = (model(x).softmax(1) - folded(x).softmax(1)).abs().max().item()
    assert diff < 1e-5, diff


class DataDependent(torch.nn.Module):
    """Branches on a tensor's value: FX cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            y = y * 2
        return self.head(y.mean(dim=(2, 3)))


def test_models_it_cannot_rewrite_are_kept_as_they_are():
    traced_fails = DataDependent().eval()
    # traceable, but its BatchNorm follows a ReLU, not a convolution: nothing to fold, so not swapped for a traced copy
    nothing_to_fold = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                                          torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    scripted = torch.jit.script(with_trained_statistics(torchvision.models.resnet18(num_classes=3)))
    no_batchnorm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    for model in (traced_fails, scripted, no_batchnorm, nothing_to_fold):
        kept, done = fold_batchnorm(model, 16)
        assert kept is model and not done, type(model).__name__


def test_a_fold_that_changes_the_outputs_is_refused(monkeypatch):
    """The folded model is checked against the original before use: a rewrite that moves the outputs
    (here: the FX pass made to corrupt one weight) is not used."""
    import torch.fx.experimental.optimization as fx_optimization

    real = fx_optimization.fuse

    def corrupting(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        conv = next(m for m in out.modules() if isinstance(m, torch.nn.Conv2d))
        conv.weight.data.mul_(3)
        return out

    monkeypatch.setattr(fx_optimization, "fuse", corrupting)
    model = with_trained_statistics(torchvision.models.resnet18(num_classes=5))
    kept, done = fold_batchnorm(model, 32)
    assert kept is model and not done


def test_the_ensemble_folds_what_it_can_and_averages_the_same(tmp_path):
    """Stage one's TeacherEnsemble: the torchvision teacher is folded, the TorchScript one is used as
    it is, and the averaged probabilities equal those of the unfolded teachers."""
    from mealkd.core.models import load_model, parse_spec_list
    from mealkd.precompute.ensemble import TeacherEnsemble

    torch.manual_seed(0)
    resnet = with_trained_statistics(torchvision.models.resnet18(num_classes=4))
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    torch.jit.script(with_trained_statistics(torchvision.models.resnet18(num_classes=4))).save(str(tmp_path / "script.pt"))
    specs = f"torchvision:resnet18@{tmp_path / 'r18.pth'},{tmp_path / 'script.pt'}:w=0.5"
    reference = [load_model(s, num_classes=4) for s in parse_spec_list(specs)]
    ensemble = TeacherEnsemble([load_model(s, num_classes=4) for s in parse_spec_list(specs)], default_size=32, temperature=2.0,
                               device=torch.device("cpu"))
    assert ensemble.folded == [True, False]
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        expected = sum(w * torch.softmax(t.module.eval()(x) / 2.0, 1) for t, w in zip(reference, (2 / 3, 1 / 3)))
        got = ensemble([x])
    assert (got - expected).abs().max().item() < 1e-5

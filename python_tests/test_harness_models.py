"""Models: ResNet-32, torchvision backbones, linear/cosine heads, LWS and τ-normalisation."""
import pytest
import torch
import torch.nn.functional as F

from ltkernels.models import LWSHead, NormedLinear, build_model, make_backbone, tau_normalize_


def test_resnet32_size_and_features():
    m = build_model({"arch": "resnet32", "head": "linear"}, 10)
    # He et al. 2016, Table 6: ResNet-32 for CIFAR has 0.46M parameters
    n = sum(p.numel() for p in m.parameters())
    assert 0.45e6 < n < 0.47e6
    logits, f = m(torch.randn(2, 3, 32, 32), return_features=True)
    assert logits.shape == (2, 10) and f.shape == (2, 64)
    assert (f >= 0).all()  # post-ReLU pooled features


def test_normed_linear_official_layout_and_cosine():
    torch.manual_seed(0)
    h = NormedLinear(6, 4)
    assert h.weight.shape == (6, 4)
    torch.testing.assert_close(h.weight.norm(dim=0), torch.ones(4))
    x = torch.randn(3, 6)
    w = h.weight.detach()
    expect = torch.stack([torch.stack([torch.dot(x[i], w[:, j]) / (x[i].norm() * w[:, j].norm())
                                       for j in range(4)]) for i in range(3)])
    torch.testing.assert_close(h(x), expect)
    m = build_model({"arch": "digits_cnn", "head": "cosine", "width": 4}, 10)
    out = m(torch.randn(5, 1, 8, 8))
    assert out.abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("arch,dim", [("resnet50", 2048), ("resnext50_32x4d", 2048), ("resnet152", 2048)])
def test_torchvision_backbones_build_without_download(arch, dim):
    with torch.device("meta"):
        bb = make_backbone(arch)
    assert bb.out_features == dim
    if arch == "resnet50":  # one real forward at a tiny resolution
        m = build_model({"arch": arch, "head": "cosine"}, 7)
        m.eval()
        logits, f = m(torch.randn(1, 3, 32, 32), return_features=True)
        assert logits.shape == (1, 7) and f.shape == (1, dim)


def test_lws_and_tau_norm():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    lws = LWSHead(lin)
    assert [n for n, p in lws.named_parameters() if p.requires_grad] == ["scales"]
    x = torch.randn(4, 5)
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(lws(x), lin(x) * torch.tensor([1.0, 2.0, 0.5]))
    W = lin.weight.detach().clone()
    tau_normalize_(lin, tau=1.0)
    torch.testing.assert_close(lin.weight.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(lin(x), x @ (W / W.norm(dim=1, keepdim=True)).t())


def test_bad_arch_and_head_name_allowed_values():
    with pytest.raises(ValueError, match="model.arch.*allowed values.*resnet32"):
        make_backbone("resnet18")
    with pytest.raises(ValueError, match="model.head.*allowed values"):
        build_model({"arch": "digits_cnn", "head": "mlp"}, 10)


def test_fused_cosine_head_matches_eager():
    from ltkernels.cosine import NormedLinear as cls
    torch.manual_seed(0)
    eager = build_model({"arch": "digits_cnn", "head": "cosine", "width": 4}, 10)
    fused = build_model({"arch": "digits_cnn", "head": "cosine", "width": 4, "cosine_impl": "fused"}, 10)
    assert isinstance(fused.head, cls)
    fused.load_state_dict(eager.state_dict())   # same (in, out) layout: checkpoints interchange
    x = torch.randn(6, 1, 8, 8)
    eager.eval(), fused.eval()
    torch.testing.assert_close(fused(x), eager(x), rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(eager(x).sum(), eager.head.weight)[0]
    g2 = torch.autograd.grad(fused(x).sum(), fused.head.weight)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)

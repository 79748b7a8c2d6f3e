import pytest
import torch

from latentwire.stage1.adapters import MLPAdapter, VocabAdapter, build_adapter, load_adapter_state, rms, save_adapter
from latentwire.wire.compress import PCA
from latentwire.config import AdapterConfig
from latentwire.errors import LatentWireError
from latentwire.stage1.losses import answer_cross_entropy, logit_kl, reconstruction_loss


@pytest.fixture
def table():
    g = torch.Generator().manual_seed(0)
    return torch.randn(300, 32, generator=g) * torch.linspace(2, 0.2, 32)


@pytest.fixture
def pca(table):
    return PCA(8).fit(table)


@pytest.mark.parametrize("kind", ["mlp", "vocab", "linear"])
@pytest.mark.parametrize("calibration", ["none", "rms", "learned"])
def test_adapter_shapes_and_dtypes(table, pca, kind, calibration):
    a = build_adapter(AdapterConfig(adapter=kind, calibration=calibration, vocab_topk=16), pca, table)
    z = pca.transform(table[:10])
    y = a(z)
    assert y.shape == (10, 32) and y.dtype == torch.float32
    assert a(z.reshape(2, 5, 8)).shape == (2, 5, 32)
    assert a(z[:0]).shape == (0, 32)


def test_mlp_init_pca_starts_at_pca_inverse(table, pca):
    a = build_adapter(AdapterConfig(adapter="mlp", calibration="none", init_pca=True, residual=True), pca, table)
    z = pca.transform(table[:20])
    assert torch.allclose(a(z), pca.inverse_transform(z), atol=1e-5)


def test_rms_calibration_sets_table_rms(table, pca):
    a = build_adapter(AdapterConfig(adapter="mlp", calibration="rms"), pca, table)
    y = a(pca.transform(table[:20]))
    assert torch.allclose(rms(y).squeeze(-1), torch.full((20,), float(rms(table).mean())), rtol=1e-4)


def test_seed_style_output_layernorm_destroys_scale(table, pca):
    cfg = AdapterConfig(adapter="mlp", output_norm=True, calibration="none", residual=False, init_pca=False)
    y = build_adapter(cfg, pca, table)(pca.transform(table[:20]))
    assert torch.allclose(rms(y).squeeze(-1), torch.ones(20), atol=1e-2)  # unit RMS, whatever the table's


def test_vocab_adapter_recovers_tokens_exactly_when_sharp(table, pca):
    a = build_adapter(AdapterConfig(adapter="vocab", calibration="none", vocab_topk=8), pca, table)
    with torch.no_grad():
        a.log_temp.fill_(-20.0)
    ids = torch.arange(300)
    y = a(pca.transform(table))
    assert torch.allclose(y, table, atol=1e-4)
    assert torch.equal(a.nearest_ids(pca.transform(table)), ids)


def test_vocab_adapter_temperature_gets_gradient(table, pca):
    a = build_adapter(AdapterConfig(adapter="vocab", vocab_topk=8), pca, table)
    z = pca.transform(table[:50]) + 0.3 * torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    reconstruction_loss(a(z), table[:50])["loss"].backward()
    assert a.log_temp.grad is not None and torch.isfinite(a.log_temp.grad)


def test_adapter_checkpoint_roundtrip_and_compat(tmp_path, table, pca):
    cfg = AdapterConfig(adapter="mlp", calibration="learned")
    a = build_adapter(cfg, pca, table)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01)
    meta = {"model": "m", "d_model": 32, "vocab_size": 300, "compress_dim": 8, "adapter": "mlp"}
    save_adapter(a, tmp_path / "a.pt", meta)
    b = build_adapter(cfg, pca, table)
    load_adapter_state(b, tmp_path / "a.pt", meta)
    z = pca.transform(table[:5])
    assert torch.equal(a(z), b(z))
    with pytest.raises(LatentWireError, match="compress_dim is 8 there but 16 in this run"):
        load_adapter_state(b, tmp_path / "a.pt", meta | {"compress_dim": 16})


def test_reconstruction_loss_terms():
    x = torch.randn(4, 6, 10)
    t = reconstruction_loss(x, x)
    assert t["loss"].item() == pytest.approx(0.0, abs=1e-6) and t["cos"].item() == pytest.approx(1.0)
    t = reconstruction_loss(-x, x, w_cos=1.0, w_mse=0.0)
    assert t["loss"].item() == pytest.approx(2.0, abs=1e-5)
    t = reconstruction_loss(2 * x, x, w_cos=0.0, w_mse=1.0)
    assert t["mse"].item() == pytest.approx(x.pow(2).mean().item(), rel=1e-5)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, 0] = True
    y = x.clone()
    y[1:] = 0
    assert reconstruction_loss(y, x, mask)["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_losses_on_empty_masks_are_zero_not_nan():
    x = torch.randn(2, 3, 5, requires_grad=True)
    t = reconstruction_loss(x, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.bool))
    assert t["loss"].item() == 0.0
    t["loss"].backward()
    logits = torch.randn(2, 3, 7, requires_grad=True)
    ce = answer_cross_entropy(logits, torch.full((2, 3), -100))
    kl = logit_kl(logits, torch.randn(2, 3, 7), torch.zeros(2, 3, dtype=torch.bool))
    assert ce.item() == 0.0 and kl.item() == 0.0
    (ce + kl).backward()
    assert torch.isfinite(logits.grad).all()


def test_ce_and_kl_values():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert answer_cross_entropy(logits, torch.tensor([[0]])).item() == pytest.approx(-torch.log(torch.tensor(0.5)).item())
    assert logit_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    other = torch.log(torch.tensor([[[0.25, 0.5, 0.25]]]))
    assert logit_kl(other, logits).item() > 0

import pytest
import torch

from latentwire.wire.compress import PCA, Identity, RandomProjection, load_compressor, svd_flip_components
from latentwire.errors import LatentWireError


def _data(n=500, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3, 0.1, d)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scales + torch.randn(d, generator=g, dtype=torch.float64)


def test_pca_matches_torch_svd():
    x = _data()
    k = 5
    pca = PCA(k).fit(x.float())
    xc = x - x.mean(0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    ref = svd_flip_components(vh[:k]).float()
    assert torch.allclose(pca.components_, ref, atol=1e-4)
    ev = (s ** 2) / x.shape[0]
    assert torch.allclose(pca.explained_variance_, ev[:k].float(), rtol=1e-4)
    # ratio is against the TOTAL variance, not the kept components
    assert torch.allclose(pca.explained_variance_ratio_, (ev[:k] / ev.sum()).float(), rtol=1e-4)
    assert float(pca.explained_variance_ratio_.sum()) < 0.999


def test_pca_streaming_equals_batch_and_is_deterministic():
    x = _data().float()
    a = PCA(4).fit(x)
    b = PCA(4).fit([x[:100], x[100:333], x[333:]])
    assert torch.allclose(a.components_, b.components_, atol=1e-5)
    assert torch.allclose(a.mean_, b.mean_, atol=1e-6)
    c = PCA(4).fit(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))])
    assert torch.allclose(a.components_, c.components_, atol=1e-5)  # sign-fixed: order does not flip signs


def test_pca_weighted_equals_repeated_rows():
    x = _data(50).float()
    w = torch.randint(1, 4, (50,))
    a = PCA(3).partial_fit(x, weights=w.float())
    b = PCA(3).fit(x.repeat_interleave(w, dim=0))
    assert torch.allclose(a.components_, b.components_, atol=1e-4)


def test_pca_full_rank_roundtrip_and_dims():
    x = _data(200, 8).float()
    p = PCA(8).fit(x)
    assert torch.allclose(p.inverse_transform(p.transform(x)), x, atol=1e-4)
    assert p.transform(x).shape == (200, 8)
    with pytest.raises(LatentWireError, match="--compress-dim"):
        PCA(9).fit(x)


def test_random_and_identity():
    x = _data(100, 16).float()
    r = RandomProjection(4, seed=3).fit(d_model=16)
    assert r.transform(x).shape == (100, 4) and r.inverse_transform(r.transform(x)).shape == x.shape
    assert torch.equal(RandomProjection(4, seed=3).fit(d_model=16).components_, r.components_)
    i = Identity().fit(x)
    assert torch.equal(i.inverse_transform(i.transform(x)), x)


def test_save_load_and_compatibility(tmp_path):
    x = _data(100, 10).float()
    p = PCA(3).fit(x)
    p.save(tmp_path / "c.pt", meta={"d_model": 10, "compress_dim": 3})
    q = load_compressor(tmp_path / "c.pt", expect={"d_model": 10})
    assert torch.equal(q.transform(x), p.transform(x))
    with pytest.raises(LatentWireError, match="d_model is 10 there but 576 in this run"):
        load_compressor(tmp_path / "c.pt", expect={"d_model": 576})


def test_fit_token_ids_streams_an_embedding_module():
    emb = torch.nn.Embedding(50, 8)
    ids = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(0))
    a = PCA(3).fit_token_ids(emb, ids, chunk=64)
    b = PCA(3).fit(emb(ids).detach())
    assert torch.allclose(a.components_, b.components_, atol=1e-5)
    with pytest.raises(LatentWireError, match="no tokens"):
        PCA(3).fit_token_ids(emb, ids[:0])

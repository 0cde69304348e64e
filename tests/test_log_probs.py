"""perl/verl_glue/log_probs.py: token log-probs in row chunks give verl's row-by-row values and
gradients, and verl's own entry point uses them once PeRL's engine is imported."""

import pytest
import torch


def _verl_row_by_row(logits, labels):
    """verl 0.9.1's `logprobs_from_logits_v2` as written (the contract test pins its source)."""
    import torch.nn.functional as F

    if logits.dtype in [torch.float32, torch.float64]:
        logits_labels = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
        logsumexp_values = torch.stack([torch.logsumexp(logit, dim=-1) for logit in logits])
        return logits_labels - logsumexp_values
    out = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        out.append(F.log_softmax(row_logits, dim=-1).gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 50), (3, 11, 50), (1, 50)])
@pytest.mark.parametrize("chunk", [1 << 24, 50 * 4])  # the whole batch at once; 4 rows a chunk
def test_chunks_give_the_row_by_row_values_and_gradients(monkeypatch, dtype, shape, chunk):
    from perl.verl_glue import log_probs

    monkeypatch.setattr(log_probs, "MAX_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    base = (3 * torch.randn(*shape, generator=g)).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    want, got = _verl_row_by_row(a, labels), log_probs.chunked_logprobs(b, labels)
    assert got.shape == want.shape == labels.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)
    weights = torch.randn(labels.shape, generator=g).to(dtype)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_verls_entry_point_takes_the_chunks_once_perls_engine_is_imported():
    import verl.utils.torch_functional as verl_F

    import perl.verl_glue.engine  # noqa: F401
    from perl.verl_glue.log_probs import chunked_logprobs

    calls = []
    original = verl_F.logprobs_from_logits_v2
    assert original is chunked_logprobs
    try:
        verl_F.logprobs_from_logits_v2 = lambda logits, labels: calls.append(logits.shape) or original(logits, labels)
        logits, labels = torch.randn(6, 9), torch.randint(0, 9, (6,))
        out = verl_F.logprobs_from_logits(logits, labels)
    finally:
        verl_F.logprobs_from_logits_v2 = original
    assert calls == [torch.Size([6, 9])]  # no flash-attn here: verl's own entry point reached it
    torch.testing.assert_close(out, torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1))

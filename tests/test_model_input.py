"""What elbolab's own data hands out goes straight into a model: uint8 0/1 or 0..255 images
and [B, 1, 28, 28] tensors give the same log weights as the float [B, D] they stand for, and
anything else is refused in one line naming the shape and dtype expected."""

from __future__ import annotations

import pytest
import torch

from elbolab.config import ModelConfig
from elbolab.data import load
from elbolab.evaluation import evaluate_bounds, log_likelihood
from elbolab.models import build_model


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(latent_dim=4, hidden=(16,)), 784).eval()


def weights(m, x, k: int = 3) -> torch.Tensor:
    torch.manual_seed(5)
    with torch.no_grad():
        return m.log_weights(x, k)


def test_the_uint8_split_of_the_readme_example_equals_its_float_images() -> None:
    ds = load("binarized-mnist-embedded")
    x = ds.split("test")[:6]
    assert x.dtype == torch.uint8
    m = model()
    want = weights(m, ds.as_float("test")[:6])
    torch.testing.assert_close(weights(m, x), want, rtol=0, atol=0)
    torch.testing.assert_close(weights(m, x.reshape(6, 1, 28, 28)), want, rtol=0, atol=0)
    torch.testing.assert_close(weights(m, x.bool().reshape(6, 28, 28)), want, rtol=0, atol=0)


def test_grey_uint8_is_scaled_to_unit_floats_in_log_weights_and_the_likelihood() -> None:
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (5, 784), generator=g, dtype=torch.uint8)
    m = model()
    torch.testing.assert_close(weights(m, grey), weights(m, grey.float() / 255), rtol=0, atol=0)
    ll = log_likelihood(m, grey.reshape(5, 1, 28, 28), k=4, batch_size=2, chunk_size=2).per_point
    want = log_likelihood(m, grey.float() / 255, k=4, batch_size=2, chunk_size=2).per_point
    torch.testing.assert_close(ll, want, rtol=0, atol=0)
    assert evaluate_bounds(m, grey, k=2) == evaluate_bounds(m, grey.float() / 255, k=2)


@pytest.mark.parametrize(("x", "said"), [
    (torch.zeros(3, 28, 27), "got float32 [3, 28, 27]"),
    (torch.zeros(784), "got float32 [784]"),
    (torch.full((2, 784), 7, dtype=torch.int64), "integer images must be 0/1"),
])
def test_other_input_is_refused_in_one_line_naming_what_is_expected(x, said) -> None:
    with pytest.raises(ValueError, match="OneLayerVAE") as e:
        model().log_weights(x, 2)
    assert said in str(e.value) and "\n" not in str(e.value)
    if x.is_floating_point():
        assert "expected images [B, 784]" in str(e.value)


def test_images_with_a_channel_go_into_a_pythae_adapted_model() -> None:
    models = pytest.importorskip("pythae.models")
    from elbolab.adapters.pythae import from_pythae

    torch.manual_seed(0)
    adapter = from_pythae(models.VAE(models.VAEConfig(input_dim=(1, 4, 4), latent_dim=3))).eval()
    x = (torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.4).to(torch.uint8)
    torch.testing.assert_close(weights(adapter, x), weights(adapter, x.reshape(5, 16).float()), rtol=0, atol=0)

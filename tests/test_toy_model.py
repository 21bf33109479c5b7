import numpy as np
import pytest
import torch

from difflens.errors import DifflensError
from difflens.models.toy.adapter import ToyAdapter
from difflens.models.toy.model import ToyT2I, pack, unpack
from difflens.models.toy.quality import adherence_prompts
from difflens.models.toy.text import ToyTokenizer
from difflens.world.classifier import adherence


@pytest.fixture(scope="module")
def toy():
    return ToyAdapter.load()


def test_pack_unpack_round_trip():
    x = torch.randn(2, 3, 32, 32)
    t = pack(x)
    assert t.shape == (2, 256, 12)
    # Token (row 1, col 2) holds pixels rows 2-3, cols 4-5.
    assert torch.equal(t[0, 1 * 16 + 2].view(3, 2, 2), x[0, :, 2:4, 4:6])
    assert torch.equal(unpack(t), x)


def test_position_channels_one_hot_and_legacy_configs():
    from difflens.models.toy.model import ToyConfig, onehot_position_channels

    oh = onehot_position_channels(16)[0]
    assert oh.shape == (256, 32) and torch.equal(oh.sum(1), torch.full((256,), 2.0))
    r, c = 5, 11
    assert oh[r * 16 + c, r] == 1 and oh[r * 16 + c, 16 + c] == 1
    cfg = ToyConfig()
    assert cfg.position_onehot and cfg.extra_channels == cfg.coord_channels + 32
    # A config written before the option existed loads as it was trained: no one-hot channels.
    legacy = ToyConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "position_onehot"})
    assert not legacy.position_onehot and legacy.extra_channels == legacy.coord_channels


def test_tokenizer_fixed_length_and_errors():
    tok = ToyTokenizer(32)
    ids, mask = tok(["a red circle", ""])
    assert ids.shape == (2, 32) and mask[0].sum() == 4 and mask[1].sum() == 1
    with pytest.raises(DifflensError, match="purple"):
        tok(["a purple circle"])
    with pytest.raises(DifflensError, match="too long"):
        tok([" ".join(["a red circle and"] * 10) + " a red circle"])


def test_shipped_model_is_a_real_flux_transformer(toy):
    from diffusers import FluxTransformer2DModel

    assert isinstance(toy.transformer, FluxTransformer2DModel)
    cfg = toy.transformer.config
    assert cfg.num_layers >= 2 and cfg.num_single_layers >= 2
    assert toy.grid_hw == (16, 16)
    assert "transformer_blocks.1:img" in toy.sites() and "single_transformer_blocks.1:txt" in toy.sites()
    n_bytes = sum(p.numel() * p.element_size() for p in toy.model.parameters())
    assert n_bytes < 20 * 2**20


def test_same_seed_same_image_independent_of_batch(toy):
    p = ["a small red circle in the top left on a black plain background", "a large blue seven in the center"]
    a = toy.generate(p, [3, 4], steps=4).images
    b = toy.generate(p[1:], [4], steps=4).images
    c = toy.generate(p, [3, 9], steps=4).images
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a[1], b[0])
    assert np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_adherence_on_a_small_sample(toy):
    """Measured on 200 held-out images (README): colour, size, position and background 100%,
    object 71.5% (the issue's 80% target is still open). Bounds sit ~3 standard errors of a
    48-image sample below those, so a regression in any factor fails loudly."""
    prompts = adherence_prompts(48, objects=1, seed=777)
    images = toy.generate(prompts, list(range(5000, 5048))).images
    acc = adherence(prompts, images)["accuracy"]
    assert acc["color"] >= 0.9, acc
    assert acc["position"] >= 0.9, acc
    assert acc["size"] >= 0.85, acc
    assert acc["object"] >= 0.5, acc
    assert acc["bgcolor"] >= 0.9 and acc["bg"] >= 0.9, acc

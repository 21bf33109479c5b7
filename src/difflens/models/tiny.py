"""Tiny random-weight diffusers pipelines, built offline from configs in a second.

Why it exists: the code paths a GPU user takes with FLUX.1, SD3, PixArt-Sigma or DiT (loading a
pipeline folder, the adapters' sites, CFG rows, hooks, harvest, interventions) can be exercised
on a CPU in seconds; the tests run on these pipelines, `examples/02_your_own_flux.py` uses the
Flux one as a stand-in for FLUX.1, and a new adapter can be smoke-tested on one. Each is the real
diffusers pipeline class with hidden sizes of 16-32, two layers and 32 px images; tokenizers are
made in code (a byte-level CLIP vocabulary without merges, a character-level T5 vocabulary), so
nothing is downloaded. The weights are random: images are noise-like and the features a
dictionary learns on them mean nothing.

    pipe = tiny_pipeline("sd3")                          # a StableDiffusion3Pipeline
    folder = save_tiny_pipeline("flux", "runs/tiny-flux")  # then load_adapter(str(folder))
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from difflens.errors import DifflensError

TINY_PX = 32  # image side: 16 latent px with a 2x VAE

# family -> (what it stands in for, its builder(seed, clip_length)); flux is schnell-like, flux-dev
# adds the guidance embedding and resolution-dependent timestep shifting of FLUX.1-dev
FAMILIES = {
    "flux": ("FluxPipeline (FLUX.1-schnell-like)", lambda seed, clip: _flux(seed, clip)),
    "flux-dev": ("FluxPipeline (FLUX.1-dev-like: guidance embedding, dynamic shifting)",
                 lambda seed, clip: _flux(seed, clip, dev=True)),
    "sd3": ("StableDiffusion3Pipeline", lambda seed, clip: _sd3(seed, clip)),
    "pixart": ("PixArtSigmaPipeline", lambda seed, clip: _pixart(seed)),
    "dit": ("DiTPipeline", lambda seed, clip: _dit(seed)),
}

# The shape SD3, PixArt and DiT transformers share: 2x2 patches of a 16 px, 4-channel latent, two
# blocks of 4 heads x 8.
PATCHED = {"sample_size": TINY_PX // 2, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
           "num_attention_heads": 4}

DIT_LABELS = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 207: "golden retriever"}


def tiny_pipeline(family: str, seed: int = 0, *, clip_length: int = 16):
    """The tiny random pipeline of `family` (one of FAMILIES); the same seed gives the same weights.

    `clip_length` is the CLIP tokenizers' maximum length (Flux and SD3; PixArt and DiT have no
    CLIP). Each character is a token, so the tests' 16 holds a short prompt; 77 (FLUX.1's) holds a
    sentence without truncation warnings."""
    if family not in FAMILIES:
        raise DifflensError(f"no tiny pipeline for family {family!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[family][1](seed, clip_length)


def save_tiny_pipeline(family: str, folder: str | Path, seed: int = 0, *, clip_length: int = 16) -> Path:
    """Build `tiny_pipeline(family, seed, clip_length=...)` and `save_pretrained` it into `folder`
    (safetensors), a folder `difflens.models.load_adapter` reads. Refuses a folder that holds files.

    DiT checkpoints on the hub keep `id2label` in model_index.json, which save_pretrained does not
    write; it is added so a saved tiny DiT resolves class names like the real one."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DifflensError(f"{folder} already exists and is not an empty folder: pass a new folder to save into")
    pipe = tiny_pipeline(family, seed, clip_length=clip_length)
    pipe.save_pretrained(folder, safe_serialization=True)
    if family == "dit":
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        id2label: dict[str, list[str]] = {}
        for name, idx in pipe.labels.items():
            id2label.setdefault(str(idx), []).append(name)
        index["id2label"] = {k: ", ".join(v) for k, v in id2label.items()}
        index_path.write_text(json.dumps(index, indent=2))
    return folder


def _byte_chars() -> list[str]:
    # Byte-level BPE alphabet: printable bytes stand for themselves, the rest move above 255.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    moved = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(moved))]


def _clip_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for ch in _byte_chars():
            vocab[ch + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"]
    pieces += list(string.ascii_lowercase + string.digits)
    pieces += ["\u2581" + c for c in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=[(p, -1.0) for p in pieces], extra_ids=0)


def _clip_text_encoder(tokenizer, *, hidden: int = 32, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return model.eval()


def _t5_encoder(tokenizer, *, d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(cfg).eval()


def _vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_PX,
        scaling_factor=1.0,
        shift_factor=0.0,
    ).eval()


def _flux(seed: int, clip_length: int, *, dev: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok2 = _clip_tokenizer(clip_length), _t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=dev,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0 if dev else 1.0,
        use_dynamic_shifting=dev,
        base_image_seq_len=16,
        max_image_seq_len=256,
        base_shift=0.5,
        max_shift=1.15,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(seed),
        text_encoder=_clip_text_encoder(tok, seed=seed),
        tokenizer=tok,
        text_encoder_2=_t5_encoder(tok2, seed=seed),
        tokenizer_2=tok2,
        transformer=transformer,
    )


def _sd3(seed: int, clip_length: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2, tok3 = _clip_tokenizer(clip_length), _clip_tokenizer(clip_length), _t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        **PATCHED,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,  # two CLIP projections of 16
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed),
        text_encoder=_clip_text_encoder(tok, hidden=16, projection=True, seed=seed),
        tokenizer=tok,
        text_encoder_2=_clip_text_encoder(tok2, hidden=16, projection=True, seed=seed + 1),
        tokenizer_2=tok2,
        text_encoder_3=_t5_encoder(tok3, d_model=32, seed=seed),
        tokenizer_3=tok3,
    )


def _pixart(seed: int):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tok = _t5_tokenizer()
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        **PATCHED,
        caption_channels=32,
        cross_attention_dim=32,
        out_channels=8,
        use_additional_conditions=False,
    ).eval()
    return PixArtSigmaPipeline(
        tokenizer=tok,
        text_encoder=_t5_encoder(tok, seed=seed),
        vae=_vae(seed),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _dit(seed: int):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        **PATCHED,
        out_channels=8,
        num_embeds_ada_norm=1000,
    ).eval()
    return DiTPipeline(transformer=transformer, vae=_vae(seed), scheduler=DDIMScheduler(), id2label=DIT_LABELS)

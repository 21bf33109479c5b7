"""Tiny random-weight diffusers pipelines built offline from configs, for fast adapter tests.

Each builder returns a real pipeline (FluxPipeline, StableDiffusion3Pipeline,
PixArtSigmaPipeline, DiTPipeline) whose parts are a few kilobytes: hidden sizes 16-32, two
layers, 32 px images. Tokenizers are made in code (a byte-level CLIP BPE vocabulary without
merges, a character-level T5 unigram vocabulary), so nothing is downloaded. `save(pipe, dir)`
writes one with `save_pretrained` so `load_adapter(dir)` can be exercised.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

TINY_PX = 32  # image side used by the tests: 16 latent px with a 2x VAE


def _byte_chars() -> list[str]:
    # Byte-level BPE alphabet: printable bytes stand for themselves, the rest move above 255.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    moved = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(moved))]


def clip_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for ch in _byte_chars():
            vocab[ch + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"]
    pieces += list(string.ascii_lowercase + string.digits)
    pieces += ["\u2581" + c for c in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=[(p, -1.0) for p in pieces], extra_ids=0)


def clip_text_encoder(tokenizer, *, hidden: int = 32, projection: bool = False, seed: int = 0):
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


def t5_encoder(tokenizer, *, d_model: int = 32, seed: int = 0):
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


def tiny_vae(seed: int = 0):
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


def flux_pipeline(*, guidance_embeds: bool = False, dynamic_shifting: bool = False, seed: int = 0):
    """schnell-like by default; `guidance_embeds=True, dynamic_shifting=True` is dev-like."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok2 = clip_tokenizer(), t5_tokenizer()
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
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0 if dynamic_shifting else 1.0,
        use_dynamic_shifting=dynamic_shifting,
        base_image_seq_len=16,
        max_image_seq_len=256,
        base_shift=0.5,
        max_shift=1.15,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(seed),
        text_encoder=clip_text_encoder(tok, seed=seed),
        tokenizer=tok,
        text_encoder_2=t5_encoder(tok2, seed=seed),
        tokenizer_2=tok2,
        transformer=transformer,
    )


def sd3_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_PX // 2,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,  # two CLIP projections of 16
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed),
        text_encoder=clip_text_encoder(tok, hidden=16, projection=True, seed=seed),
        tokenizer=tok,
        text_encoder_2=clip_text_encoder(tok2, hidden=16, projection=True, seed=seed + 1),
        tokenizer_2=tok2,
        text_encoder_3=t5_encoder(tok3, d_model=32, seed=seed),
        tokenizer_3=tok3,
    )


def pixart_pipeline(seed: int = 0):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tok = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=TINY_PX // 2,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=32,
        out_channels=8,
        use_additional_conditions=False,
    ).eval()
    return PixArtSigmaPipeline(
        tokenizer=tok,
        text_encoder=t5_encoder(tok, seed=seed),
        vae=tiny_vae(seed),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


DIT_LABELS = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 207: "golden retriever"}


def dit_pipeline(seed: int = 0):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        sample_size=TINY_PX // 2,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        num_embeds_ada_norm=1000,
    ).eval()
    return DiTPipeline(transformer=transformer, vae=tiny_vae(seed), scheduler=DDIMScheduler(), id2label=DIT_LABELS)


def save(pipe, folder: str | Path) -> Path:
    """`save_pretrained` into `folder` (safetensors) and return it.

    DiT checkpoints on the hub keep `id2label` in model_index.json, which save_pretrained does
    not write; it is added so a saved tiny DiT resolves class names like the real one."""
    import json

    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    labels = getattr(pipe, "labels", None)
    if type(pipe).__name__ == "DiTPipeline" and labels:
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        id2label: dict[str, list[str]] = {}
        for name, idx in labels.items():
            id2label.setdefault(str(idx), []).append(name)
        index["id2label"] = {k: ", ".join(v) for k, v in id2label.items()}
        index_path.write_text(json.dumps(index, indent=2))
    return folder

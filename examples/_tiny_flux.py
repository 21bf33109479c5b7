"""A tiny random-weight FLUX.1-style pipeline saved to a folder: the stand-in that lets
`02_your_own_flux.py` run on a laptop CPU without downloading 30 GB.

It is a real diffusers `FluxPipeline` (FluxTransformer2DModel with 2 double-stream and 2 single-stream
blocks, CLIP + T5 text encoders, a VAE, the flow-matching scheduler), only with hidden sizes of 16-32
and random weights, so its images are noise-like and its features mean nothing. Tokenizers are built
in code, so nothing is downloaded. On a GPU you do not need this file: pass a hub id instead.
"""

from __future__ import annotations

import string
from pathlib import Path


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    # byte-level alphabet without merges: every printable byte is a token (plus its end-of-word form)
    chars = [chr(b) for b in range(ord("!"), ord("~") + 1)]
    vocab = {c + end: i for i, (c, end) in enumerate((c, end) for end in ("", "</w>") for c in chars)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, unk_token="<|endoftext|>")


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + list(string.ascii_lowercase + string.digits)
    pieces += ["\u2581" + c for c in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=[(p, -1.0) for p in pieces], extra_ids=0)


def make_tiny_flux(folder: str | Path, seed: int = 0) -> Path:
    """Build the pipeline and `save_pretrained` it into `folder` (safetensors); returns the folder."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=clip_tok.model_max_length, projection_dim=32,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
        scaling_factor=1.0, shift_factor=0.0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), vae=vae,
                        text_encoder=clip.eval(), tokenizer=clip_tok, text_encoder_2=t5.eval(), tokenizer_2=t5_tok,
                        transformer=transformer.eval())
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder

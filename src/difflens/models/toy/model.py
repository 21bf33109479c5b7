"""The toy model: text encoder + diffusers FluxTransformer2DModel over 2x2-patch pixel tokens."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from difflens.errors import DifflensError
from difflens.models.toy.text import ToyTextEncoder, ToyTokenizer
from difflens.world import vocab as V

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "toy_t2i"


@dataclass
class ToyConfig:
    image_size: int = V.IMAGE_SIZE
    patch: int = V.PATCH
    channels: int = 3
    num_layers: int = 2  # double-stream blocks
    num_single_layers: int = 2
    heads: int = 4
    head_dim: int = 32
    text_dim: int = 64
    text_layers: int = 2
    max_text_length: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    # RoPE position ids of image tokens are row/col times this: Flux's theta=10000 leaves most
    # rotary frequencies near zero across a 16-token grid, and the spread makes them informative.
    rope_scale: float = 4.0
    # Extra input channels carrying fixed sinusoidal (row, col) coordinates, concatenated to the
    # noisy pixels as Flux Fill / Kontext concatenate conditioning channels: RoPE alone only gives
    # relative positions, and "top left" needs absolute ones.
    coord_channels: int = 8
    # One-hot row and column channels (2 x grid), so the patch embedding learns an absolute
    # position embedding per row and column. The 8 smooth sin/cos channels only resolve coarse
    # position: v3 (without these) placed and coloured objects but drew every shape as a blob.
    position_onehot: bool = True
    guidance_default: float = 5.0
    # Sigma range (lo, hi] where classifier-free guidance applies; plain conditional outside.
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    steps_default: int = 12
    extra: dict = field(default_factory=dict)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def extra_channels(self) -> int:
        """Fixed position channels concatenated to the noisy pixels of each token."""
        return self.coord_channels + (2 * self.grid if self.position_onehot else 0)

    @property
    def token_channels(self) -> int:
        return self.channels * self.patch * self.patch

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        d["guidance_interval"] = list(self.guidance_interval)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ToyConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known.setdefault("position_onehot", False)  # configs written before the option existed
        if "axes_dims_rope" in known:
            known["axes_dims_rope"] = tuple(known["axes_dims_rope"])
        if "guidance_interval" in known:
            lo, hi = (float(v) for v in known["guidance_interval"])
            if not 0.0 <= lo < hi <= 1.0:
                raise DifflensError(f"toy config guidance_interval must be sigmas 0 <= lo < hi <= 1, got {[lo, hi]}")
            known["guidance_interval"] = (lo, hi)
        return cls(**known)


def pack(images_BCHW: torch.Tensor, patch: int = V.PATCH) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p], row-major tokens, as Flux packs its latents."""
    B, C, H, W = images_BCHW.shape
    x = images_BCHW.view(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


def unpack(tokens_BND: torch.Tensor, size: int = V.IMAGE_SIZE, patch: int = V.PATCH) -> torch.Tensor:
    B, N, D = tokens_BND.shape
    g = size // patch
    C = D // (patch * patch)
    x = tokens_BND.view(B, g, g, C, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, C, size, size)


def image_ids(grid: int, scale: float = 1.0) -> torch.Tensor:
    """RoPE position ids (0, row, col) * scale for the image tokens, laid out as FluxPipeline does."""
    ids = torch.zeros(grid, grid, 3)
    ids[..., 1] = torch.arange(grid)[:, None] * scale
    ids[..., 2] = torch.arange(grid)[None, :] * scale
    return ids.reshape(grid * grid, 3)


def coordinate_channels(grid: int, n: int) -> torch.Tensor:
    """[1, grid*grid, n]: sin/cos of row and column at n/4 frequencies each."""
    if n == 0:
        return torch.zeros(1, grid * grid, 0)
    if n % 4:
        raise ValueError(f"coord_channels must be a multiple of 4, got {n}")
    pos = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    freqs = torch.arange(1, n // 4 + 1, dtype=torch.float32) * torch.pi
    ang_r = pos[:, None, None] * freqs  # [g, 1, f]
    ang_c = pos[None, :, None] * freqs  # [1, g, f]
    rows = torch.cat([ang_r.sin(), ang_r.cos()], -1).expand(grid, grid, -1)
    cols = torch.cat([ang_c.sin(), ang_c.cos()], -1).expand(grid, grid, -1)
    return torch.cat([rows, cols], -1).reshape(1, grid * grid, n)


def onehot_position_channels(grid: int) -> torch.Tensor:
    """[1, grid*grid, 2*grid]: one-hot row then one-hot column of each token."""
    eye = torch.eye(grid)
    rows = eye[:, None, :].expand(grid, grid, grid)
    cols = eye[None, :, :].expand(grid, grid, grid)
    return torch.cat([rows, cols], -1).reshape(1, grid * grid, 2 * grid)


class ToyT2I(nn.Module):
    """Predicts the rectified-flow velocity (noise - image) for packed pixel tokens."""

    def __init__(self, cfg: ToyConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ToyConfig()
        self.tokenizer = ToyTokenizer(cfg.max_text_length)
        self.text_encoder = ToyTextEncoder(len(self.tokenizer.vocab), cfg.max_text_length, cfg.text_dim, cfg.text_layers)
        self.transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=cfg.token_channels + cfg.extra_channels,
            out_channels=cfg.token_channels,
            num_layers=cfg.num_layers,
            num_single_layers=cfg.num_single_layers,
            attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.heads,
            joint_attention_dim=cfg.text_dim,
            pooled_projection_dim=cfg.text_dim,
            guidance_embeds=False,
            axes_dims_rope=cfg.axes_dims_rope,
        )
        self.register_buffer("img_ids", image_ids(cfg.grid, cfg.rope_scale), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(cfg.max_text_length, 3), persistent=False)
        coords = coordinate_channels(cfg.grid, cfg.coord_channels)
        if cfg.position_onehot:
            coords = torch.cat([coords, onehot_position_channels(cfg.grid)], dim=-1)
        self.register_buffer("coords", coords, persistent=False)

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(prompts)
        dev = self.img_ids.device
        return self.text_encoder(ids.to(dev), mask.to(dev))

    def forward(self, x_BND: torch.Tensor, sigma_B: torch.Tensor, text_BTD: torch.Tensor, pooled_BD: torch.Tensor) -> torch.Tensor:
        # The Flux transformer scales its timestep input by 1000 internally: pass sigma in [0, 1].
        if self.cfg.extra_channels:
            x_BND = torch.cat([x_BND, self.coords.to(x_BND.dtype).expand(x_BND.shape[0], -1, -1)], dim=-1)
        return self.transformer(
            hidden_states=x_BND,
            encoder_hidden_states=text_BTD,
            pooled_projections=pooled_BD,
            timestep=sigma_B,
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            return_dict=False,
        )[0]

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        from difflens.utils import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = folder / ".model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(folder / "model.safetensors")
        atomic_write_text(folder / "config.json", json.dumps(self.cfg.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path | None = None, device: str = "cpu") -> "ToyT2I":
        from safetensors.torch import load_file

        folder = Path(folder) if folder else ASSET_DIR
        if not (folder / "model.safetensors").exists():
            raise DifflensError(
                f"no toy model weights in {folder}; run `difflens zoo train toy` to train them"
            )
        cfg = ToyConfig.from_dict(json.loads((folder / "config.json").read_text()))
        model = cls(cfg)
        model.load_state_dict(load_file(str(folder / "model.safetensors"), device="cpu"))
        return model.to(device).eval()

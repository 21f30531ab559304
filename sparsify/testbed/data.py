"""Procedural "latent" videos for the test-bed: textured shapes that move, spin and bounce over panning textures.

Scene parameters are drawn on the CPU from a seed, then rendered on any device (the same video on CPU and GPU
up to rounding). Fine textures, objects tracked across frames and camera pans call for local, temporal and
global attention. 8 classes = motion (4) x texture (2), label = 2 * motion + texture, each with a fixed 8-token
text-like embedding ("<bos> a video of striped shapes bouncing <eos>"); the null condition is zeros.
"""

from __future__ import annotations

import math

import torch

from .model import LATENT_SHAPE, TEXT_DIM, TEXT_LEN

MOTIONS: tuple[str, ...] = ("bouncing", "orbiting", "panning", "tracking")
"""bouncing: objects translate and bounce off the borders over a still background; orbiting: objects circle
around centres; panning: the camera pans, objects are still in the world (pure global motion); tracking: the
camera pans and objects bounce on their own."""
TEXTURES: tuple[str, ...] = ("striped", "checkered")
NUM_CLASSES: int = len(MOTIONS) * len(TEXTURES)
MAX_OBJECTS: int = 3
_VOCAB: tuple[str, ...] = ("<bos>", "<eos>", "a", "video", "of", "shapes") + TEXTURES + MOTIONS
_VOCAB_SEED = 20240


def class_name(label: int) -> str:
    """Caption of a class label, e.g. `class_name(0) == "a video of striped shapes bouncing"`."""
    return f"a video of {TEXTURES[label % 2]} shapes {MOTIONS[label // 2]}"


def _tokens(label: int) -> list[str]:
    return ["<bos>"] + class_name(label).split() + ["<eos>"]


def _vocab_tables() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(_VOCAB_SEED)
    words = torch.randn(len(_VOCAB), TEXT_DIM, generator=g)
    pos = torch.randn(TEXT_LEN, TEXT_DIM, generator=g) * 0.3
    return dict(zip(_VOCAB, words)), pos


def class_embeddings(labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
    """Text-like condition `[B, TEXT_LEN, TEXT_DIM]` (fp32, on `labels.device`) for class labels.

    Args:
        labels: int `[B]` in `[0, NUM_CLASSES)`.
        drop: optional bool `[B]`; True rows get the null condition (zeros), for classifier-free guidance.
    """
    words, pos = _vocab_tables()
    table = torch.stack([torch.stack([words[w] for w in _tokens(c)]) + pos for c in range(NUM_CLASSES)])
    assert table.shape[1] == TEXT_LEN
    out = table.to(labels.device)[labels.long()]
    if drop is not None:
        out = out * (~drop.to(out.device)).float()[:, None, None]
    return out


def null_embedding(batch: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The unconditional condition: zeros `[B, TEXT_LEN, TEXT_DIM]`."""
    return torch.zeros(batch, TEXT_LEN, TEXT_DIM, device=device)


def sample_params(batch: int, seed: int, labels: torch.Tensor | None = None,
                  latent_shape: tuple[int, int, int, int] = LATENT_SHAPE) -> dict[str, torch.Tensor]:
    """Draw the random scene parameters of `batch` videos on the CPU (deterministic for `seed`)."""
    C, F, H, W = latent_shape
    g = torch.Generator().manual_seed(int(seed))
    B, J = batch, MAX_OBJECTS

    def U(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (B,), generator=g)
    labels = labels.long().cpu()
    motion, texture = labels // 2, labels % 2
    size = float(min(H, W))
    p = {"labels": labels, "motion": motion, "texture": texture}
    # Background: two colours blended by a texture evaluated at world coordinates (camera offset added).
    p["bg_a"], p["bg_b"] = U(-0.9, 0.9, B, C), U(-0.9, 0.9, B, C)
    p["bg_freq"] = U(1 / 10, 1 / 4, B, 3)  # cycles per latent pixel
    p["bg_angle"], p["bg_phase"] = U(0, math.pi, B, 3), U(0, 2 * math.pi, B, 3)
    p["bg_period"] = U(5.0, 10.0, B)  # checker period (pixels)
    # Camera: constant pan velocity for "panning" and "tracking".
    pans = (motion >= 2).float()
    cam_speed, cam_dir = U(0.5, 1.5, B) * pans, U(0, 2 * math.pi, B)
    p["cam_v"] = torch.stack([cam_speed * torch.cos(cam_dir), cam_speed * torch.sin(cam_dir)], -1)  # (x, y)
    # Objects.
    n_obj = torch.randint(1, J + 1, (B,), generator=g)
    p["active"] = torch.arange(J)[None, :] < n_obj[:, None]
    p["shape"] = torch.randint(0, 4, (B, J), generator=g)
    p["radius"] = U(3.0, 6.0, B, J) * size / 32
    p["obj_a"], p["obj_b"] = U(-1, 1, B, J, C), U(-1, 1, B, J, C)
    p["obj_period"] = U(2.5, 5.0, B, J) * size / 32
    p["obj_phase"] = U(0, 2 * math.pi, B, J)
    p["angle0"] = U(0, 2 * math.pi, B, J)
    spin = U(0.08, 0.3, B, J) * torch.where(torch.rand(B, J, generator=g) < 0.5, -1.0, 1.0)
    p["spin"] = spin * (motion != 2).float()[:, None]  # world-still objects do not spin
    # bouncing/tracking: start + velocity; orbiting: centre, orbit radius, angular speed.
    p["pos0"] = torch.stack([U(6, W - 6, B, J), U(6, H - 6, B, J)], -1)
    speed, vdir = U(0.7, 2.0, B, J), U(0, 2 * math.pi, B, J)
    p["vel"] = torch.stack([speed * torch.cos(vdir), speed * torch.sin(vdir)], -1)
    p["orbit_c"] = torch.stack([U(0.3 * W, 0.7 * W, B, J), U(0.3 * H, 0.7 * H, B, J)], -1)
    p["orbit_r"] = U(3.0, 8.0, B, J) * size / 32
    p["orbit_w"] = U(0.15, 0.4, B, J) * torch.where(torch.rand(B, J, generator=g) < 0.5, -1.0, 1.0)
    p["orbit_ph"] = U(0, 2 * math.pi, B, J)
    return p


def _bounce(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Reflect a free trajectory into [lo, hi] (a triangle wave): elastic bounces off both walls."""
    span = (hi - lo).clamp_min(1e-3)
    u = torch.remainder(x - lo, 2 * span)
    return lo + span - (u - span).abs()


def render(params: dict[str, torch.Tensor], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
           latent_shape: tuple[int, int, int, int] = LATENT_SHAPE) -> torch.Tensor:
    """Render scene parameters to videos `[B, C, F, H, W]` with values in [-1, 1]."""
    C, F, H, W = latent_shape
    p = {k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype) for k, v in params.items()}
    B = p["labels"].shape[0]
    t = torch.arange(F, device=device, dtype=torch.float32)  # frames
    ys = torch.arange(H, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(W, device=device, dtype=torch.float32) + 0.5

    # ---- background, in world coordinates: screen + camera offset (cam = v * t)
    cam = p["cam_v"][:, None, :] * t[None, :, None]  # [B, F, 2]
    X = xs[None, None, None, :] + cam[..., 0, None, None]  # [B, F, 1, W]
    Y = ys[None, None, :, None] + cam[..., 1, None, None]  # [B, F, H, 1]
    waves = 0.0
    for i in range(3):
        ang, fr, ph = (p[k][:, i, None, None, None] for k in ("bg_angle", "bg_freq", "bg_phase"))
        waves = waves + torch.sin(2 * math.pi * fr * (X * torch.cos(ang) + Y * torch.sin(ang)) + ph)
    stripes = 0.5 + waves / 6.0  # [B, F, H, W] in [0, 1]
    per = p["bg_period"][:, None, None, None]
    ang = p["bg_angle"][:, 0, None, None, None]
    u = X * torch.cos(ang) + Y * torch.sin(ang)
    v = -X * torch.sin(ang) + Y * torch.cos(ang)
    checker = torch.sigmoid(4.0 * torch.sin(2 * math.pi * u / per) * torch.sin(2 * math.pi * v / per))
    checker = 0.8 * checker + 0.2 * (0.5 + 0.5 * torch.sin(2 * math.pi * p["bg_freq"][:, 1, None, None, None] * u))
    is_checker = (p["texture"] == 1)[:, None, None, None]
    bg_tex = torch.where(is_checker, checker, stripes)
    img = p["bg_b"][:, :, None, None, None] + (p["bg_a"] - p["bg_b"])[:, :, None, None, None] * bg_tex[:, None]

    # ---- object trajectories: [B, J, F, 2] screen positions and [B, J, F] angles
    motion = p["motion"][:, None, None]
    r = p["radius"]
    lo = r[..., None, None].expand(B, -1, 1, 2)
    hi = torch.stack([W - r, H - r], -1)[:, :, None, :]
    free = p["pos0"][:, :, None, :] + p["vel"][:, :, None, :] * t[None, None, :, None]
    bounce = _bounce(free, lo, hi)
    ow = p["orbit_w"][..., None] * t + p["orbit_ph"][..., None]  # [B, J, F]
    circle = torch.stack([torch.cos(ow), torch.sin(ow)], -1)
    orbit = p["orbit_c"][:, :, None, :] + p["orbit_r"][..., None, None] * circle
    mid = (F - 1) / 2.0
    still = p["pos0"][:, :, None, :] - (cam - p["cam_v"][:, None, :] * mid)[:, None]  # moves with the world
    pos = torch.where(motion[..., None] == 1, orbit, torch.where(motion[..., None] == 2, still, bounce))
    theta = p["angle0"][..., None] + p["spin"][..., None] * t  # [B, J, F]

    dx = xs[None, None, None, None, :] - pos[..., 0, None, None]  # [B, J, F, 1, W]
    dy = ys[None, None, None, :, None] - pos[..., 1, None, None]  # [B, J, F, H, 1]
    c, s = torch.cos(theta)[..., None, None], torch.sin(theta)[..., None, None]
    lu, lv = c * dx + s * dy, -s * dx + c * dy  # object-local coordinates [B, J, F, H, W]
    rr = r[:, :, None, None, None]
    au, av = lu.abs(), lv.abs()
    sdf = torch.stack([  # [4, B, J, F, H, W]
        torch.sqrt(lu**2 + lv**2) - rr,  # disc
        torch.maximum(au, av) - 0.85 * rr,  # square
        torch.maximum(au * 0.866 + lv * 0.5, -lv) - 0.5 * rr,  # triangle
        torch.minimum(torch.maximum(au - rr, av - rr / 3), torch.maximum(au - rr / 3, av - rr))])  # plus
    idx = p["shape"][None, :, :, None, None, None].expand(1, B, -1, F, H, W)
    sdf = sdf.gather(0, idx)[0]
    alpha = torch.sigmoid(-sdf / 0.4) * p["active"][:, :, None, None, None].float()
    per = p["obj_period"][:, :, None, None, None]
    ph = p["obj_phase"][:, :, None, None, None]
    o_stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * lu / per + ph)
    o_checker = torch.sigmoid(5.0 * torch.sin(2 * math.pi * lu / per + ph) * torch.sin(2 * math.pi * lv / per))
    o_tex = torch.where((p["texture"] == 1)[:, None, None, None, None], o_checker, o_stripes)
    for j in range(MAX_OBJECTS):  # painter's order: slot 0 at the back
        ca, cb = p["obj_a"][:, j, :, None, None, None], p["obj_b"][:, j, :, None, None, None]
        col = cb + (ca - cb) * o_tex[:, j, None]
        a = alpha[:, j, None]
        img = img * (1 - a) + a * col
    return img.clamp(-1, 1).to(dtype)


def make_batch(batch: int, seed: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               labels: torch.Tensor | None = None, latent_shape: tuple[int, int, int, int] = LATENT_SHAPE
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of clean videos, their labels and their text-like conditions, deterministic for `seed`.

    Returns:
        `(x0 [B, C, F, H, W] in [-1, 1], labels int64 [B], cond [B, TEXT_LEN, TEXT_DIM])` on `device`.

    Example:
        >>> x0, labels, cond = make_batch(4, seed=0)
    """
    params = sample_params(batch, seed, labels=labels, latent_shape=latent_shape)
    x0 = render(params, device=device, dtype=dtype, latent_shape=latent_shape)
    labels = params["labels"].to(device)
    return x0, labels, class_embeddings(labels).to(dtype)

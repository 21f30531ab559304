"""Procedural "latent" videos of `testbed-16k`: 3-6 textured objects, camera pans and zooms, crossings and scene cuts.

Every clip is drawn from a seed: the random scene parameters are drawn on the CPU with a `torch.Generator`, then
rendered (vectorized over clips, frames, objects and pixels) on any device, so one seed gives the same video on
CPU and GPU up to float rounding. The content is built so that a denoiser needs every kind of attention head:

- local: fine object and background textures (periods of 5-20 latent pixels at 64 x 64, i.e. 2-10 tokens);
- temporal: objects keep shape, colours and texture across frames while they bounce, orbit, cross and spin;
- global: the camera pans (every pixel moves the same way) or zooms (every pixel moves away from or towards the
  centre); a low-frequency colour gradient spans the whole scene;
- long range: in the "crossing" classes every object enters on one side of the frame and leaves on the other
  within the clip;
- scene cuts: in `CUT_PROB` of the clips a hard cut at a random frame switches to a second scene of the same
  class (other colours, objects, positions and camera), so attention across the cut is useless;
- sink-like: a small static logo sits in the top-left corner of every frame of every clip.

Classes (18) = motion (3) x camera (3) x texture (2); label = (3 * motion + camera) * 2 + texture. Each class maps
to a 10-token text-like sequence ("<bos> a video of striped shapes bouncing camera still <eos>") of fixed
pseudo-word embeddings, like a frozen text encoder's output; the null (unconditional) condition is all zeros.
"""

from __future__ import annotations

import math

import torch

from .data import _bounce
from .model import TEXT_DIM
from .variants import LATENT_SHAPE_16K

MOTIONS: tuple[str, ...] = ("bouncing", "orbiting", "crossing")
"""bouncing: objects translate and bounce off the scene borders; orbiting: objects circle around centres;
crossing: objects cross the whole frame along straight lines, entering and leaving within the clip."""
CAMERAS: tuple[str, ...] = ("still", "panning", "zooming")
"""still: fixed camera; panning: constant velocity over the scene; zooming: exponential zoom in or out."""
TEXTURES: tuple[str, ...] = ("striped", "checkered")
NUM_CLASSES: int = len(MOTIONS) * len(CAMERAS) * len(TEXTURES)
MIN_OBJECTS: int = 3
MAX_OBJECTS: int = 6
NUM_SHAPES: int = 5  # disc, square, triangle, plus, ring
CUT_PROB: float = 0.35
#: Length of the text-like condition sequence.
TEXT_LEN: int = 10
_VOCAB: tuple[str, ...] = ("<bos>", "<eos>", "a", "video", "of", "shapes", "camera") + TEXTURES + MOTIONS + CAMERAS
_VOCAB_SEED = 20241


def class_name(label: int) -> str:
    """Caption of a class label, e.g. `class_name(0) == "a video of striped shapes bouncing, camera still"`."""
    texture, rest = label % len(TEXTURES), label // len(TEXTURES)
    motion, camera = rest // len(CAMERAS), rest % len(CAMERAS)
    return f"a video of {TEXTURES[texture]} shapes {MOTIONS[motion]}, camera {CAMERAS[camera]}"


def _tokens(label: int) -> list[str]:
    return ["<bos>"] + class_name(label).replace(",", "").split() + ["<eos>"]


def _class_table() -> torch.Tensor:
    g = torch.Generator().manual_seed(_VOCAB_SEED)
    words = dict(zip(_VOCAB, torch.randn(len(_VOCAB), TEXT_DIM, generator=g)))
    pos = torch.randn(TEXT_LEN, TEXT_DIM, generator=g) * 0.3
    table = torch.stack([torch.stack([words[w] for w in _tokens(c)]) + pos for c in range(NUM_CLASSES)])
    assert table.shape[1] == TEXT_LEN
    return table


def class_embeddings(labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
    """Text-like condition `[B, TEXT_LEN, TEXT_DIM]` (fp32, on `labels.device`) for class labels.

    Args:
        labels: int `[B]` in `[0, NUM_CLASSES)`.
        drop: optional bool `[B]`; True rows get the null condition (zeros), for classifier-free guidance.

    Example:
        >>> class_embeddings(torch.tensor([0, 17])).shape
        torch.Size([2, 10, 64])
    """
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
        raise ValueError(f"labels must be in [0, {NUM_CLASSES}); got {labels.tolist()}")
    out = _class_table().to(labels.device)[labels]
    if drop is not None:
        out = out * (~drop.to(out.device)).float()[:, None, None]
    return out


def null_embedding(batch: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The unconditional condition: zeros `[B, TEXT_LEN, TEXT_DIM]`."""
    return torch.zeros(batch, TEXT_LEN, TEXT_DIM, device=device)


def sample_params(
    batch: int,
    seed: int,
    labels: torch.Tensor | None = None,
    latent_shape: tuple[int, int, int, int] = LATENT_SHAPE_16K,
    cut_prob: float = CUT_PROB,
) -> dict[str, torch.Tensor]:
    """Draw the random parameters of `batch` clips on the CPU (deterministic for `seed`).

    Per clip: `labels`, `motion`, `camera`, `texture` and `cut` (`[B]`; the first frame of the second scene, `F`
    when the clip has no cut). Per scene (two per clip, shape `[B, 2, ...]`): colours, textures, camera and objects.

    Example:
        >>> p = sample_params(4, seed=0, latent_shape=(4, 16, 64, 64))
        >>> p["cut"].shape, p["pos0"].shape
        (torch.Size([4]), torch.Size([4, 2, 6, 2]))
    """
    C, F, H, W = latent_shape
    if not 0.0 <= cut_prob <= 1.0:
        raise ValueError(f"cut_prob must be in [0, 1]; got {cut_prob}")
    g = torch.Generator().manual_seed(int(seed))
    B, S, J = batch, 2, MAX_OBJECTS
    size = float(min(H, W))
    k = size / 32  # lengths below are in latent pixels of a 32-pixel frame, scaled to this one

    def U(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    def sign(*shape):
        return torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)

    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (B,), generator=g)
    labels = labels.long().cpu()
    if labels.shape != (B,) or int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
        raise ValueError(f"labels must be int [{B}] in [0, {NUM_CLASSES}); got {labels.tolist()}")
    texture, rest = labels % len(TEXTURES), labels // len(TEXTURES)
    motion, camera = rest // len(CAMERAS), rest % len(CAMERAS)
    p = {"labels": labels, "motion": motion, "camera": camera, "texture": texture}
    lo_cut = max(1, F // 4)
    has_cut = torch.rand(B, generator=g) < cut_prob
    cut_at = torch.randint(lo_cut, max(lo_cut + 1, F - lo_cut + 1), (B,), generator=g)
    p["cut"] = torch.where(has_cut & (F > 1), cut_at.clamp_max(F - 1), torch.full((B,), F))
    # Background: two colours blended by a texture in world coordinates, plus a scene-wide colour gradient.
    p["bg_a"], p["bg_b"] = U(-0.9, 0.9, B, S, C), U(-0.9, 0.9, B, S, C)
    p["bg_grad"] = U(-0.4, 0.4, B, S, 2, C)  # colour change per scene width along x and y
    p["bg_freq"] = U(1 / 10, 1 / 4, B, S, 3) / k  # cycles per latent pixel
    p["bg_angle"], p["bg_phase"] = U(0, math.pi, B, S, 3), U(0, 2 * math.pi, B, S, 3)
    p["bg_period"] = U(5.0, 10.0, B, S) * k  # checker period
    # Camera: pan velocity (pixels per frame) and zoom rate (log scale per frame), centred on the middle frame.
    pan = (camera == 1).float()[:, None]
    speed, cdir = U(0.4, 1.0, B, S) * k * pan, U(0, 2 * math.pi, B, S)
    p["cam_v"] = torch.stack([speed * torch.cos(cdir), speed * torch.sin(cdir)], -1)
    p["zoom_rate"] = U(0.03, 0.06, B, S) * sign(B, S) * (camera == 2).float()[:, None]
    # Objects (world coordinates: the scene spans [0, W] x [0, H] at the middle frame).
    n_obj = torch.randint(MIN_OBJECTS, J + 1, (B, S), generator=g)
    p["active"] = torch.arange(J) < n_obj[..., None]
    p["shape"] = torch.randint(0, NUM_SHAPES, (B, S, J), generator=g)
    p["radius"] = U(2.5, 5.0, B, S, J) * k
    p["obj_a"], p["obj_b"] = U(-1, 1, B, S, J, C), U(-1, 1, B, S, J, C)
    p["obj_period"] = U(2.5, 5.0, B, S, J) * k
    p["obj_phase"] = U(0, 2 * math.pi, B, S, J)
    p["angle0"] = U(0, 2 * math.pi, B, S, J)
    p["spin"] = U(0.05, 0.25, B, S, J) * sign(B, S, J)
    # bouncing: start + velocity; orbiting: centre, orbit radius, angular speed; crossing: line and timing.
    p["pos0"] = torch.stack([U(0.15, 0.85, B, S, J) * W, U(0.15, 0.85, B, S, J) * H], -1)
    speed, vdir = U(0.7, 2.0, B, S, J) * k, U(0, 2 * math.pi, B, S, J)
    p["vel"] = torch.stack([speed * torch.cos(vdir), speed * torch.sin(vdir)], -1)
    p["orbit_c"] = torch.stack([U(0.3, 0.7, B, S, J) * W, U(0.3, 0.7, B, S, J) * H], -1)
    p["orbit_r"] = U(3.0, 8.0, B, S, J) * k
    p["orbit_w"] = U(0.15, 0.4, B, S, J) * sign(B, S, J)
    p["orbit_ph"] = U(0, 2 * math.pi, B, S, J)
    p["cross_dir"] = U(0, 2 * math.pi, B, S, J)
    p["cross_off"] = U(-0.3, 0.3, B, S, J) * size  # offset of the line from the centre
    p["cross_t0"] = U(-0.25, 0.15, B, S, J) * F  # frame at which the object is at the entry point
    p["cross_dur"] = U(0.8, 1.2, B, S, J) * F  # frames from entry to exit
    return p


def _logo(C: int, H: int, W: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The static top-left logo: colour `[C, H, W]` and opacity `[H, W]` (a 2-pixel checker in a square)."""
    n = max(2, min(H, W) // 16)
    yy, xx = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    inside = ((yy >= 1) & (yy < 1 + n) & (xx >= 1) & (xx < 1 + n)).float()
    checker = (((yy // 2) + (xx // 2)) % 2).float() * 2 - 1
    chan = torch.tensor([0.8, -0.8, 0.6, -0.6] * (C // 4 + 1), device=device)[:C]
    return chan[:, None, None] * checker, 0.9 * inside


def render(
    params: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    latent_shape: tuple[int, int, int, int] = LATENT_SHAPE_16K,
) -> torch.Tensor:
    """Render clip parameters (`sample_params`) to videos `[B, C, F, H, W]` with values in [-1, 1].

    Example:
        >>> shape = (4, 8, 16, 16)
        >>> render(sample_params(2, seed=0, latent_shape=shape), latent_shape=shape).shape
        torch.Size([2, 4, 8, 16, 16])
    """
    C, F, H, W = latent_shape
    p = {k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype) for k, v in params.items()}
    B = p["labels"].shape[0]
    t = torch.arange(F, device=device, dtype=torch.float32)  # [F]
    tc = t - (F - 1) / 2.0
    ys = torch.arange(H, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(W, device=device, dtype=torch.float32) + 0.5

    # Per-frame scene parameters: scene 0 before the cut, scene 1 from the cut on -> [B, F, ...].
    scene = (t[None, :] >= p["cut"][:, None]).long()
    rows = torch.arange(B, device=device)[:, None]
    q = {k: v[rows, scene] for k, v in p.items() if v.dim() >= 2}
    motion = p["motion"][:, None, None]  # [B, 1, 1] against [B, F, J]

    # ---- camera: screen pixel -> world coordinates. Xw [B, F, 1, W], Yw [B, F, H, 1]
    zoom = torch.exp(q["zoom_rate"] * tc)  # [B, F]
    cam = q["cam_v"] * tc[None, :, None]  # [B, F, 2]
    Xw = W / 2 + (xs - W / 2) / zoom[..., None, None] + cam[..., 0, None, None]
    Yw = H / 2 + (ys[:, None] - H / 2) / zoom[..., None, None] + cam[..., 1, None, None]

    # ---- background in world coordinates: [B, F, C, H, W]
    waves = 0.0
    for i in range(3):
        ang, fr, ph = (q[k][..., i, None, None] for k in ("bg_angle", "bg_freq", "bg_phase"))
        waves = waves + torch.sin(2 * math.pi * fr * (Xw * torch.cos(ang) + Yw * torch.sin(ang)) + ph)
    stripes = 0.5 + waves / 6.0  # [B, F, H, W] in [0, 1]
    per, ang = q["bg_period"][..., None, None], q["bg_angle"][..., 0, None, None]
    u = Xw * torch.cos(ang) + Yw * torch.sin(ang)
    v = -Xw * torch.sin(ang) + Yw * torch.cos(ang)
    checker = torch.sigmoid(4.0 * torch.sin(2 * math.pi * u / per) * torch.sin(2 * math.pi * v / per))
    checker = 0.8 * checker + 0.2 * (0.5 + 0.5 * torch.sin(2 * math.pi * q["bg_freq"][..., 1, None, None] * u))
    is_checker = (p["texture"] == 1)[:, None, None, None]
    bg_tex = torch.where(is_checker, checker, stripes)[:, :, None]  # [B, F, 1, H, W]
    e = lambda x: x[..., None, None]  # noqa: E731  [B, F, C] -> [B, F, C, 1, 1]
    img = e(q["bg_b"]) + e(q["bg_a"] - q["bg_b"]) * bg_tex
    size = float(min(H, W))
    img = img + e(q["bg_grad"][:, :, 0]) * ((Xw - W / 2) / size)[:, :, None]
    img = img + e(q["bg_grad"][:, :, 1]) * ((Yw - H / 2) / size)[:, :, None]

    # ---- object trajectories in world coordinates: [B, F, J, 2] and angles [B, F, J]
    r = q["radius"]  # [B, F, J]
    tj = t[None, :, None]  # [1, F, 1]
    lo = r[..., None].expand(*r.shape, 2)
    hi = torch.stack([W - r, H - r], -1)
    bounce = _bounce(q["pos0"] + q["vel"] * tj[..., None], lo, hi)
    ow = q["orbit_w"] * tj + q["orbit_ph"]
    orbit = q["orbit_c"] + q["orbit_r"][..., None] * torch.stack([torch.cos(ow), torch.sin(ow)], -1)
    d = torch.stack([torch.cos(q["cross_dir"]), torch.sin(q["cross_dir"])], -1)  # direction of travel
    n = torch.stack([-d[..., 1], d[..., 0]], -1)  # normal: offset of the line
    reach = 0.5 * math.hypot(W, H) + r  # from the centre to just outside the frame
    prog = (tj - q["cross_t0"]) / q["cross_dur"]  # 0 at entry, 1 at exit
    centre = torch.tensor([W / 2, H / 2], device=device)
    cross = centre + n * q["cross_off"][..., None] + d * (reach * (2 * prog - 1))[..., None]
    pos = torch.where(motion[..., None] == 0, bounce, torch.where(motion[..., None] == 1, orbit, cross))
    theta = q["angle0"] + q["spin"] * tj

    # ---- objects: signed distance in object-local coordinates [B, F, J, H, W]
    dx = Xw[:, :, None] - pos[..., 0, None, None]  # [B, F, J, 1, W]
    dy = Yw[:, :, None] - pos[..., 1, None, None]  # [B, F, J, H, 1]
    c, s = torch.cos(theta)[..., None, None], torch.sin(theta)[..., None, None]
    lu, lv = c * dx + s * dy, -s * dx + c * dy
    rr = r[..., None, None]
    au, av = lu.abs(), lv.abs()
    rad = torch.sqrt(lu**2 + lv**2)
    shape = q["shape"][..., None, None]
    sdf = torch.where(shape == 0, rad - rr, (rad - 0.7 * rr).abs() - 0.3 * rr)  # disc, ring
    sdf = torch.where(shape == 1, torch.maximum(au, av) - 0.85 * rr, sdf)  # square
    sdf = torch.where(shape == 2, torch.maximum(au * 0.866 + lv * 0.5, -lv) - 0.5 * rr, sdf)  # triangle
    plus = torch.minimum(torch.maximum(au - rr, av - rr / 3), torch.maximum(au - rr / 3, av - rr))
    sdf = torch.where(shape == 3, plus, sdf)
    alpha = torch.sigmoid(-sdf / 0.4) * q["active"][..., None, None].float()
    per, ph = q["obj_period"][..., None, None], q["obj_phase"][..., None, None]
    wave_u = torch.sin(2 * math.pi * lu / per + ph)
    o_checker = torch.sigmoid(5.0 * wave_u * torch.sin(2 * math.pi * lv / per))
    o_tex = torch.where((p["texture"] == 1)[:, None, None, None, None], o_checker, 0.5 + 0.5 * wave_u)
    for j in range(MAX_OBJECTS):  # painter's order: slot 0 at the back
        ca, cb = e(q["obj_a"][:, :, j]), e(q["obj_b"][:, :, j])
        a = alpha[:, :, j, None]
        img = img * (1 - a) + a * (cb + (ca - cb) * o_tex[:, :, j, None])

    # ---- static logo, in screen coordinates
    logo, logo_a = _logo(C, H, W, device)
    img = img * (1 - logo_a) + logo_a * logo
    return img.clamp(-1, 1).permute(0, 2, 1, 3, 4).contiguous().to(dtype)


def make_batch(
    batch: int,
    seed: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    labels: torch.Tensor | None = None,
    latent_shape: tuple[int, int, int, int] = LATENT_SHAPE_16K,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of clean clips, their labels and their text-like conditions, deterministic for `seed`.

    Returns:
        `(x0 [B, C, F, H, W] in [-1, 1], labels int64 [B], cond [B, TEXT_LEN, TEXT_DIM])` on `device`.

    Example:
        >>> x0, labels, cond = make_batch(2, seed=0, latent_shape=(4, 8, 16, 16))
        >>> x0.shape, cond.shape
        (torch.Size([2, 4, 8, 16, 16]), torch.Size([2, 10, 64]))
    """
    params = sample_params(batch, seed, labels=labels, latent_shape=latent_shape)
    x0 = render(params, device=device, dtype=dtype, latent_shape=latent_shape)
    labels = params["labels"].to(device)
    return x0, labels, class_embeddings(labels).to(dtype)

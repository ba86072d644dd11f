"""Synthetic face identities: an open-set problem that trains on CPU in minutes.

An identity is a latent vector z ~ N(0, I). A fixed random generator (weights drawn once from
``GENERATOR_SEED``, the same for every dataset) maps z through tanh(W z) to the parameters of a face-like
composition of soft elliptical parts (hair, face oval, ears, eyes and irises, brows, nose, mouth and three
identity marks): their positions, sizes, angles and colours. Each image of an identity jitters z slightly
(expression) and draws its own nuisance: rotation, scale, shift, background gradient, directional light,
brightness, colour cast, sensor noise and JPEG quality. Pose and light move raw pixels more than identity
does, so pixel matching stays near chance while a CNN can learn the generator's factors and verify
identities it never saw. Images are rendered at 56x56 in numpy (batched) and resized to 112x112.

Every image is a pure function of (seed, identity, instance): output does not depend on worker count.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from PIL import Image

from largefr.seeding import derive_seed

GENERATOR_SEED = 20_240_611
LATENT_DIM = 32
RENDER_SIZE = 56
IMAGE_SIZE = 112
EXPRESSION = 0.18  # latent jitter of one image around its identity
# per-image nuisance ranges (canonical face coordinates span [-1, 1])
MAX_ROTATION_DEG, MAX_SCALE, MAX_SHIFT = 12.0, 0.12, 0.10
MAX_BRIGHTNESS, MAX_CAST, MAX_LIGHT_SLOPE = 0.3, 0.1, 0.4

# name: (base, spread) of geometric parameters in canonical face coordinates ([-1,1], y down)
_GEOMETRY = {
    "face_rx": (0.56, 0.12), "face_ry": (0.70, 0.10), "face_y": (0.06, 0.05),
    "hair_rx": (0.72, 0.15), "hair_ry": (0.55, 0.18), "hair_y": (-0.30, 0.15),
    "ear_x": (0.56, 0.06), "ear_r": (0.12, 0.05),
    "eye_x": (0.25, 0.08), "eye_y": (-0.06, 0.08), "eye_rx": (0.12, 0.04), "eye_ry": (0.06, 0.03),
    "iris_r": (0.055, 0.02), "brow_dy": (0.14, 0.05), "brow_rx": (0.15, 0.05), "brow_ry": (0.04, 0.02),
    "brow_angle": (0.0, 0.5), "nose_y": (0.16, 0.05), "nose_rx": (0.06, 0.03), "nose_ry": (0.15, 0.06),
    "mouth_y": (0.43, 0.06), "mouth_rx": (0.20, 0.09), "mouth_ry": (0.05, 0.03),
    "mark_x0": (0.0, 0.45), "mark_y0": (0.10, 0.40), "mark_r0": (0.13, 0.05),
    "mark_x1": (0.0, 0.45), "mark_y1": (0.10, 0.40), "mark_r1": (0.13, 0.05),
    "mark_x2": (0.0, 0.45), "mark_y2": (0.10, 0.40), "mark_r2": (0.13, 0.05),
}
# colour parameters (tanh outputs in (-1, 1)), mapped to RGB in _colours
_COLOURS = ["skin", "skin_r", "skin_g", "hair_a", "hair_b", "iris_a", "iris_b", "lip",
            "mark0_r", "mark0_g", "mark0_b", "mark1_r", "mark1_g", "mark1_b", "mark2_r", "mark2_g", "mark2_b",
            "mark_alpha0", "mark_alpha1", "mark_alpha2"]
_NAMES = list(_GEOMETRY) + _COLOURS
_P = {name: i for i, name in enumerate(_NAMES)}
_HAIR = np.array([[0.08, 0.06, 0.05], [0.35, 0.22, 0.12], [0.85, 0.72, 0.45], [0.62, 0.25, 0.10], [0.70, 0.70, 0.72]])
_IRIS = np.array([[0.30, 0.18, 0.08], [0.25, 0.45, 0.75], [0.30, 0.55, 0.30]])
# per-image uniforms: 0 angle, 1 scale, 2-3 shift, 4-9 background colours, 10 background direction,
# 11-12 light strength and direction, 13 brightness, 14-16 colour cast, 17-19 noise pattern/offset/sigma
_NUISANCE = 20


@dataclass(frozen=True)
class SynthSpec:
    """A synthetic dataset: ``identities`` train identities x ``per_identity`` images, plus ``holdout``
    identities (ids identities .. identities+holdout-1 of the latent table) for verification pairs."""

    identities: int
    per_identity: int
    seed: int = 0
    holdout: int = 0
    pairs: int = 0
    quality: tuple[int, int] = (70, 95)

    def __post_init__(self) -> None:
        for name, low in (("identities", 2), ("per_identity", 1), ("seed", 0), ("holdout", 0), ("pairs", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.pairs and self.holdout < 2:
            raise ValueError(f"verification pairs need holdout >= 2 identities, got holdout={self.holdout}")

    @property
    def num_samples(self) -> int:
        return self.identities * self.per_identity


class FaceGenerator:
    """The fixed random generator: latent -> part parameters -> rendered images."""

    def __init__(self, seed: int = GENERATOR_SEED) -> None:
        rng = np.random.default_rng(seed)
        self.weights = rng.standard_normal((len(_NAMES), LATENT_DIM)) * (1.4 / np.sqrt(LATENT_DIM))
        self.base = np.array([_GEOMETRY[n][0] for n in _GEOMETRY] + [0.0] * len(_COLOURS))
        self.spread = np.array([_GEOMETRY[n][1] for n in _GEOMETRY] + [1.0] * len(_COLOURS))
        self.noise_bank = rng.standard_normal((4, 3, RENDER_SIZE + 16, RENDER_SIZE + 16)).astype(np.float32)

    @cached_property
    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        c = (np.arange(RENDER_SIZE, dtype=np.float32) + 0.5) / RENDER_SIZE * 2 - 1
        gy, gx = np.meshgrid(c, c, indexing="ij")
        return gx.reshape(-1), gy.reshape(-1)

    def parameters(self, z: np.ndarray) -> np.ndarray:
        return self.base + self.spread * np.tanh(z @ self.weights.T)

    def parts(self, p: np.ndarray) -> np.ndarray:
        """[n, K, 9] parts: cx, cy, rx, ry, angle, r, g, b, opacity; drawn in order."""
        g = {name: p[:, i] for name, i in _P.items()}
        n = p.shape[0]
        skin = _lerp(np.array([0.96, 0.80, 0.68]), np.array([0.42, 0.28, 0.20]), (g["skin"] + 1) / 2)
        skin = np.clip(skin + 0.06 * np.stack([g["skin_r"], g["skin_g"], -g["skin_r"]], 1), 0, 1)
        hair = _palette(_HAIR, g["hair_a"], g["hair_b"])
        iris = _palette(_IRIS, g["iris_a"], g["iris_b"])
        lip = np.clip(skin * (0.75 + 0.1 * g["lip"][:, None]) + np.array([0.18, -0.02, -0.02]), 0, 1)
        white = np.broadcast_to(np.array([0.95, 0.95, 0.93]), (n, 3))
        zero, one = np.zeros(n), np.ones(n)
        ex, ey, by = g["eye_x"], g["eye_y"], g["eye_y"] - g["brow_dy"]
        parts = [
            (zero, g["hair_y"], g["hair_rx"], g["hair_ry"], zero, hair, one),
            (-g["ear_x"], g["face_y"], g["ear_r"], g["ear_r"] * 1.5, zero, skin * 0.9, one),
            (g["ear_x"], g["face_y"], g["ear_r"], g["ear_r"] * 1.5, zero, skin * 0.9, one),
            (zero, g["face_y"], g["face_rx"], g["face_ry"], zero, skin, one),
            (-ex, ey, g["eye_rx"], g["eye_ry"], zero, white, one),
            (ex, ey, g["eye_rx"], g["eye_ry"], zero, white, one),
            (-ex, ey, g["iris_r"], g["iris_r"], zero, iris, one),
            (ex, ey, g["iris_r"], g["iris_r"], zero, iris, one),
            (-ex, by, g["brow_rx"], g["brow_ry"], g["brow_angle"], hair, one),
            (ex, by, g["brow_rx"], g["brow_ry"], -g["brow_angle"], hair, one),
            (zero, g["nose_y"], g["nose_rx"], g["nose_ry"], zero, skin * 0.8, one * 0.8),
            (zero, g["mouth_y"], g["mouth_rx"], g["mouth_ry"], zero, lip, one),
        ]
        for k in range(3):
            colour = (np.stack([g[f"mark{k}_r"], g[f"mark{k}_g"], g[f"mark{k}_b"]], 1) + 1) / 2
            alpha = np.clip(0.5 + 0.6 * g[f"mark_alpha{k}"], 0, 1)
            parts.append((g[f"mark_x{k}"], g[f"mark_y{k}"], g[f"mark_r{k}"], g[f"mark_r{k}"], zero, colour, alpha))
        cols = [np.stack([cx, cy, rx, ry, ang], 1) for cx, cy, rx, ry, ang, _, _ in parts]
        return np.stack([np.concatenate([c, np.asarray(col), a[:, None]], 1)
                         for c, (*_, col, a) in zip(cols, parts)], 1)

    def render(self, z: np.ndarray, nuisance: np.ndarray) -> np.ndarray:
        """uint8 [n, 112, 112, 3] for latents [n, D] and nuisance uniforms [n, _NUISANCE] in [0, 1)."""
        u = nuisance.astype(np.float32)
        parts = self.parts(self.parameters(z)).astype(np.float32)
        n, r = len(u), RENDER_SIZE
        gx, gy = self._grid
        angle = (u[:, 0] - 0.5) * np.float32(2 * np.deg2rad(MAX_ROTATION_DEG))
        scale = 1 + (u[:, 1] - 0.5) * (2 * MAX_SCALE)
        shift = (u[:, 2:4] - 0.5) * (2 * MAX_SHIFT)
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        dx0, dy0 = gx - shift[:, 0, None], gy - shift[:, 1, None]
        x = (cos[:, None] * dx0 + sin[:, None] * dy0).reshape(n, r, r)
        y = (cos[:, None] * dy0 - sin[:, None] * dx0).reshape(n, r, r)
        img = self._background(u, gx, gy).reshape(n, 3, r, r)
        for k in range(parts.shape[1]):
            rows, cols = _part_window(parts[:, k], angle, scale, shift)
            self._draw(img[:, :, rows, cols], x[:, rows, cols], y[:, rows, cols], parts[:, k])
        phi = u[:, 12, None] * np.float32(2 * np.pi)
        light = 1 + (u[:, 11, None] * MAX_LIGHT_SLOPE) * (np.cos(phi) * gx + np.sin(phi) * gy)
        brightness = 1 + (u[:, 13] - 0.5) * (2 * MAX_BRIGHTNESS)
        gain = brightness[:, None] * (1 + (u[:, 14:17] - 0.5) * (2 * MAX_CAST))
        img = img.reshape(n, 3, r * r) * light[:, None, :] * (gain[:, :, None] * 255)
        img = img.reshape(n, 3, r, r) + self._noise(u)
        small = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
        return _upsample(small)

    def _noise(self, u: np.ndarray) -> np.ndarray:
        """Sensor noise [n, 3, r, r]: a random crop of a fixed noise bank, sigma 3..15 grey levels."""
        r = RENDER_SIZE
        bank = (u[:, 17] * len(self.noise_bank)).astype(int)
        off = (u[:, 18] * 16).astype(int)
        crops = np.stack([self.noise_bank[b, :, o : o + r, o : o + r] for b, o in zip(bank.tolist(), off.tolist())])
        return crops * (3 + 12 * u[:, 19])[:, None, None, None]

    @staticmethod
    def _draw(img: np.ndarray, x: np.ndarray, y: np.ndarray, part: np.ndarray) -> None:
        """Alpha-blend one soft elliptical part (per image parameters ``part`` [n, 9]) into ``img`` in place."""
        cx, cy, rx, ry, ang, opacity = (part[:, j, None, None] for j in (0, 1, 2, 3, 4, 8))
        dx, dy = x - cx, y - cy
        if np.any(part[:, 4]):
            ca, sa = np.cos(ang), np.sin(ang)
            dx, dy = dx * ca + dy * sa, dy * ca - dx * sa
        dx /= rx
        dy /= ry
        dx *= dx
        dy *= dy
        dx += dy
        np.subtract(1, dx, out=dx)
        dx *= 5 * opacity
        np.clip(dx, 0, opacity, out=dx)
        for c in range(3):
            channel = img[:, c]
            channel += dx * (part[:, 5 + c, None, None] - channel)

    @staticmethod
    def _background(u: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
        c0, c1 = u[:, 4:7, None], u[:, 7:10, None]
        phi = u[:, 10, None] * np.float32(2 * np.pi)
        t = (np.cos(phi) * gx + np.sin(phi) * gy + 1.5) / 3
        return c0 + (c1 - c0) * t[:, None, :]


def _upsample(small: np.ndarray) -> np.ndarray:
    """Bilinear resize uint8 [n, r, r, 3] -> [n, 112, 112, 3] (torch's uint8 channels-last kernel; same
    result as PIL's bilinear resize, 5x faster)."""
    x = torch.from_numpy(small).permute(0, 3, 1, 2)
    y = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return y.permute(0, 2, 3, 1).numpy()


def _part_window(part: np.ndarray, angle: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns of the render grid that part [n, 9] can cover in any image of the batch."""
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    cx = cos * part[:, 0] - sin * part[:, 1] + shift[:, 0]
    cy = sin * part[:, 0] + cos * part[:, 1] + shift[:, 1]
    reach = np.maximum(part[:, 2], part[:, 3]) * scale
    to_px = lambda v: (v + 1) / 2 * RENDER_SIZE  # noqa: E731
    c0, c1 = int(max(0, np.floor(to_px((cx - reach).min())))), int(min(RENDER_SIZE, np.ceil(to_px((cx + reach).max())) + 1))
    r0, r1 = int(max(0, np.floor(to_px((cy - reach).min())))), int(min(RENDER_SIZE, np.ceil(to_px((cy + reach).max())) + 1))
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t[:, None]


def _palette(stops: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A colour between palette stops chosen by a, tinted lighter/darker by b."""
    pos = (a + 1) / 2 * (len(stops) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)
    colour = stops[lo] + (stops[lo + 1] - stops[lo]) * (pos - lo)[:, None]
    return np.clip(colour * (1 + 0.2 * b[:, None]), 0, 1)


def identity_latents(seed: int, ids: np.ndarray) -> np.ndarray:
    """[n, LATENT_DIM] latent of each identity id (a pure function of (seed, id))."""
    return np.stack([np.random.default_rng(derive_seed(seed, "identity_latent", int(i))).standard_normal(LATENT_DIM) for i in ids])


def image_randomness(seed: int, ids: np.ndarray, instances: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: expression noise [n, D], nuisance uniforms [n, _NUISANCE], JPEG quality fraction [n]."""
    eps, nuis, q = [], [], []
    for i, j in zip(ids.tolist(), instances.tolist()):
        rng = np.random.default_rng(derive_seed(seed, "image_randomness", i, j))
        eps.append(rng.standard_normal(LATENT_DIM))
        r = rng.random(_NUISANCE + 1)
        nuis.append(r[:_NUISANCE])
        q.append(r[_NUISANCE])
    return np.stack(eps), np.stack(nuis), np.array(q)


def render_jpegs(generator: FaceGenerator, spec: SynthSpec, ids: np.ndarray, instances: np.ndarray,
                 batch: int = 64) -> list[bytes]:
    """JPEG bytes of image ``instances[k]`` of identity ``ids[k]`` for every k."""
    out: list[bytes] = []
    for s in range(0, len(ids), batch):
        i, j = ids[s : s + batch], instances[s : s + batch]
        eps, nuis, q = image_randomness(spec.seed, i, j)
        images = generator.render(identity_latents(spec.seed, i) + EXPRESSION * eps, nuis)
        lo, hi = spec.quality
        for img, qf in zip(images, q):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=int(lo + (hi - lo) * qf))
            out.append(buf.getvalue())
    return out

"""The reference MLP and CNN of the NTK benchmarks, built exactly like the peer's specs
(``../shared/peer/nt_kernel.py``: same modules, same parameter names), the peer runner, and CIFAR-shaped ResNet-18
and ViT-tiny (no peer counterparts)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

MLP_SPEC = {"kind": "mlp", "features": [512, 512, 512, 10], "activation": "tanh"}
CNN_SPEC = {"kind": "cnn", "conv": [32, 64], "kernel": [3, 3], "pool": 2, "dense": [128, 10], "activation": "relu"}
RESNET18_SPEC = {"kind": "resnet18", "widths": [64, 128, 256, 512], "classes": 10}
#: DeiT-Ti (Touvron et al. 2021) on 32x32 inputs: 4x4 patches, 64 tokens and a class token
VIT_TINY_SPEC = {"kind": "vit", "patch": 4, "dim": 192, "depth": 12, "heads": 3, "mlp": 768, "classes": 10}
#: each model's input shape, one sample
INPUT_SHAPES = {"mlp": (28, 28, 1), "cnn": (28, 28, 1), "resnet18": (32, 32, 3), "vit": (32, 32, 3)}
ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu}
PEER_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "peer"
PEER_PYTHON = pathlib.Path(os.environ.get("NTKCV_PEER_VENV", pathlib.Path.home() / ".cache/ntkcv-peer")) / "bin/python"


class MLP(nn.Module):
    features: tuple[int, ...]
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.features):
            x = nn.Dense(width)(x)
            if i < len(self.features) - 1:
                x = ACTIVATIONS[self.activation](x)
        return x


class CNN(nn.Module):
    conv: tuple[int, ...]
    kernel: tuple[int, int]
    pool: int
    dense: tuple[int, ...]
    activation: str = "relu"

    @nn.compact
    def __call__(self, x):
        for channels in self.conv:
            x = ACTIVATIONS[self.activation](nn.Conv(channels, tuple(self.kernel))(x))
            if self.pool > 1:
                x = nn.avg_pool(x, (self.pool, self.pool), (self.pool, self.pool))
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.dense):
            x = nn.Dense(width)(x)
            if i < len(self.dense) - 1:
                x = ACTIVATIONS[self.activation](x)
        return x


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (a 1x1 projection where the shape changes)."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        norm = lambda: nn.BatchNorm(use_running_average=True)  # noqa: E731  (eval mode: samples independent)
        y = nn.relu(norm()(nn.Conv(self.features, (3, 3), self.stride, use_bias=False)(x)))
        y = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = norm()(nn.Conv(self.features, (1, 1), self.stride, use_bias=False)(x))
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (He et al. 2016, the CIFAR stem: one 3x3 convolution, no max-pool): four
    stages of two basic blocks of ``widths`` channels, strides 1, 2, 2, 2, global average pool, dense
    ``classes``; BatchNorm in eval mode (running averages), so each sample's output depends on it alone."""

    widths: tuple[int, ...] = (64, 128, 256, 512)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)))
        for stage, width in enumerate(self.widths):
            x = BasicBlock(width, 1 if stage == 0 else 2)(x)
            x = BasicBlock(width)(x)
        return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(self.heads)(nn.LayerNorm()(x))
        y = nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(x))))
        return x + y


class ViT(nn.Module):
    """Vision transformer (Dosovitskiy et al. 2021): ``patch x patch`` patches embedded by a strided convolution,
    a learned class token and position embedding, ``depth`` pre-norm blocks, a final LayerNorm and a dense head on
    the class token. The defaults are DeiT-Ti's widths (Touvron et al. 2021)."""

    patch: int = 4
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp: int = 768
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.dim, (self.patch, self.patch), self.patch, padding="VALID")(x)
        x = x.reshape((x.shape[0], -1, self.dim))
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
        for _ in range(self.depth):
            x = EncoderBlock(self.heads, self.mlp)(x)
        return nn.Dense(self.classes)(nn.LayerNorm()(x)[:, 0])


def build(spec: dict) -> nn.Module:
    if spec["kind"] == "mlp":
        return MLP(tuple(spec["features"]), spec["activation"])
    if spec["kind"] == "resnet18":
        return ResNet18(tuple(spec["widths"]), spec["classes"])
    if spec["kind"] == "vit":
        return ViT(spec["patch"], spec["dim"], spec["depth"], spec["heads"], spec["mlp"], spec["classes"])
    return CNN(tuple(spec["conv"]), tuple(spec["kernel"]), spec["pool"], tuple(spec["dense"]), spec["activation"])


def peer_available() -> bool:
    return PEER_PYTHON.exists() and (PEER_DIR / "nt_kernel.py").exists()


def peer_env() -> dict[str, str]:
    """The environment of a process of the peer's Python: on CPU, TensorFlow quiet, and no ``XLA_FLAGS`` (the peer's
    older XLA aborts on a flag it does not know)."""
    return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu",
            "TF_CPP_MIN_LOG_LEVEL": "3"}


def run_peer(spec: dict, x: np.ndarray, variables, trace_axes=(-1,), implementations=(1, 2, 3), reps=3,
             timeout=1800) -> dict:
    """neural-tangents' kernels (as it returns them: averaged over traced axes) and median seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "spec.json").write_text(json.dumps(spec))
        np.savez(tmp / "x.npz", x=np.asarray(x))
        flat = flatten_dict(jax.device_get(dict(variables)))
        np.savez(tmp / "params.npz", **{"/".join(k): np.asarray(v) for k, v in flat.items()})
        command = [str(PEER_PYTHON), str(PEER_DIR / "nt_kernel.py"), "--spec", str(tmp / "spec.json"),
                   "--inputs", str(tmp / "x.npz"), "--params", str(tmp / "params.npz"), "--out", str(tmp / "out.npz"),
                   "--trace-axes", ",".join(map(str, trace_axes)),
                   "--implementations", ",".join(map(str, implementations)), "--reps", str(reps)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=peer_env())
        if result.returncode != 0:
            raise RuntimeError(f"peer failed: {result.stderr[-2000:]}")
        return dict(np.load(tmp / "out.npz"))

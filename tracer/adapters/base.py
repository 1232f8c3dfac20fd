"""What an adapter tells the tracer about one model family; everything else is shared."""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from analysis.errors import UnsupportedModelError
from tracer.spans import TextTokens


@dataclass(frozen=True)
class Layer:
    """A traced joint attention: its block path (`transformer_blocks.3`), kind and module."""

    name: str
    kind: str  # "double" or "single" (joint attention), "cross" (image queries, text keys)
    attention: torch.nn.Module
    heads: int
    # A cross-attention's SDPA calls, one per group of text keys in a softmax of its own (Wan
    # image-to-video: the image context, then the text), laid end to end in the text sequence.
    calls: int = 1


@dataclass
class Generation:
    """What the tracer needs to know of one pipeline call, read from its arguments."""

    text: TextTokens  # without segments when the caller passed embeddings only
    attrs: dict[str, Any]  # run attributes: prompt, seed, size, guidance, ...
    entity_names: list[str] = field(default_factory=list)
    entity_masks: np.ndarray | None = None  # (entity, y, x) on the token grid, nonzero = inside


@dataclass(frozen=True)
class DenoiserCall:
    """One call of the denoiser: which step of the schedule, and the token layout.

    Text tokens sit at `[text_start, text_start + text_len)` of the joint sequence and the image
    tokens, row-major on `grid`, from `image_start` (default: right after the text). Any other
    tokens (a reference image's) take part in the softmax but get no map.
    """

    timestep: float  # in the scheduler's units (the values of `scheduler.timesteps`)
    text_len: int
    grid: tuple[int, ...]  # latent token grid: (rows, cols); video: (frames, rows, cols)
    text_start: int = 0
    image_start: int | None = None
    batch_index: int = 0  # the batch element that is the conditional generation of the prompt
    dtype: torch.dtype | None = None  # its latents': what the model computes in (autocast aside)

    @property
    def image_first(self) -> int:
        """Where the image tokens begin in the joint sequence."""
        return self.text_start + self.text_len if self.image_start is None else self.image_start

    @property
    def layout(self) -> tuple[int, int, int, int, tuple[int, int]]:
        """Everything that places tokens, to tell a changed layout from the same one."""
        return (self.text_start, self.text_len, self.image_first, self.batch_index, self.grid)


class Adapter(ABC):
    """One model family: its joint attentions, token layout, text and denoising steps."""

    backend: ClassVar[str]
    families: ClassVar[str]  # the model families it traces, as an unsupported model is told
    # Directions the model's attention does not have, with why (the store says so).
    absent_directions: ClassVar[Mapping[str, str]] = {}

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @classmethod
    @abstractmethod
    def matches(cls, pipe: Any) -> bool:
        """Whether this adapter can trace `pipe`."""

    @abstractmethod
    def layers(self) -> list[Layer]:
        """Every joint attention of the denoiser, in execution order."""

    @abstractmethod
    def generation(self, arguments: Mapping[str, Any]) -> Generation:
        """The text, entities and attributes of a call with these (bound, defaulted) arguments."""

    @abstractmethod
    def watch_denoiser(self, on_call: Callable[[DenoiserCall], None]) -> Callable[[], None]:
        """Call `on_call` before every denoiser evaluation; returns a function that stops it."""

    @abstractmethod
    def schedule(self, first_timestep: float) -> tuple[np.ndarray, np.ndarray]:
        """Timesteps and sigmas of the steps this generation runs, starting at `first_timestep`."""

    @abstractmethod
    def image(self, output: Any) -> np.ndarray | None:
        """The first decoded image of a pipeline output as (H, W, 3) uint8, if it has one."""

    @abstractmethod
    def check_attention(self, layers: list[Layer]) -> None:
        """Raise UnsupportedModelError if these layers' attention would not reach torch's SDPA,
        where the tap reads q and k (checked before a run is created)."""

    def latent_grid(self, attrs: Mapping[str, Any]) -> tuple[int, ...]:
        """The token grid a generation with these run attributes (height, width, num_frames)
        will have, before it runs: FLUX's 16 pixels a token unless the family says otherwise."""
        return int(attrs.get("height") or 1024) // 16, int(attrs.get("width") or 1024) // 16

    def run_attrs(self) -> dict[str, Any]:
        """Attributes describing the model and pipeline (id, class, scheduler, dtype)."""
        return {"pipeline": type(self.pipe).__name__, "backend": self.backend}


def image_to_uint8(image: Any) -> np.ndarray | None:
    """A PIL image, a float [0, 1] array or a uint8 array as (H, W, 3) uint8; None otherwise."""
    if image is None:
        return None
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.transpose(1, 2, 0)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        return None
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


def seed_of(generator: Any) -> int | None:
    """The initial seed of a torch generator (or the first of a list), if one was given."""
    if isinstance(generator, list | tuple):
        generator = generator[0] if generator else None
    return int(generator.initial_seed()) if isinstance(generator, torch.Generator) else None


def library_versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions (those that are installed)."""
    return {name: found for name in names if (found := _version(name)) is not None}


@functools.cache  # read from the installed metadata: milliseconds each, and a run asks at its start
def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def first_of(value: Any) -> Any:
    """The first element of a list or tuple argument (a batch of prompts), else the value."""
    if isinstance(value, list | tuple):
        return value[0] if value else None
    return value


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types (what a run attribute can hold); other objects as strings."""
    return json.loads(json.dumps(value, default=str))


def token_grid(img_ids: torch.Tensor) -> tuple[int, int]:
    """The (rows, cols) latent grid of FLUX image ids (`[N, 3]`, FLUX.2's `[B, N, 4]`), checked
    to be row-major and complete.

    The generated image's tokens lead; reference images' (Kontext, FLUX.2 editing) follow with
    another first id, and are not part of the grid.
    """
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    ids = ids.round().long().cpu()
    others = (ids[:, 0] != ids[0, 0]).nonzero()
    ids = ids[: int(others[0]) if len(others) else len(ids), 1:3]
    rows, cols = int(ids[:, 0].max()) + 1, int(ids[:, 1].max()) + 1
    expected = torch.arange(rows * cols)
    if ids.shape[0] != rows * cols or not torch.equal(ids[:, 0] * cols + ids[:, 1], expected):
        raise UnsupportedModelError(
            f"image tokens are not a complete row-major {rows}x{cols} grid "
            f"({ids.shape[0]} image ids); attnscope can't place them on a map"
        )
    return rows, cols

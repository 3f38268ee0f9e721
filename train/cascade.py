"""Inference through the trained cascade: text -> prior -> decoder -> upsamplers, and its variants.

    cascade = Cascade.load(prior="runs/prior", decoder="runs/decoder",
                           upsamplers=["runs/upsampler_256", "runs/upsampler_1024"])
    out = cascade.text_to_image(["a red circle"], seed=0)          # out.images: uint8 (B, 3, H, W)

Each stage is a run directory (or a checkpoint in one, or an inference export: train/checkpoint.py);
it is rebuilt as its LightningModule with the EMA weights, so sampling is the code that evaluated it
in training. The CLIP is the decoder's (its ``clip_ckpt``) unless given; every stage must share it.

- :meth:`Cascade.text_to_image`: CLIP text embedding -> prior (guidance, best-of) -> decoder (guidance,
  caption) -> each upsampler. Without a prior the text embedding stands in for the image embedding.
- :meth:`Cascade.variations`: CLIP image embedding of an input image -> decoder without caption, DDIM
  with eta > 0 (optionally starting from the DDIM inversion of the image, the paper's Figure 3).
- :meth:`Cascade.inpaint`: image + mask + caption; at every step of every stage the known region is
  replaced by the input noised to that step (replace-known-region), with optional resampling passes
  (the sample renoised one step and denoised again, RePaint's harmonisation).
- :meth:`Cascade.interpolate`: decoder images along the slerp between two images' CLIP embeddings.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from data.images import to_uint8, to_unit_range
from data.progress import Progress
from train.checkpoint import load_stage, owner_of
from train.diffusion import SAMPLERS, GaussianDiffusion
from train.frozen_clip import FrozenClip
from train.modules.decoder import DecoderModule
from train.modules.upsampler import UpsamplerModule

log = logging.getLogger(__name__)


ROLES = {  # what the cascade loads a run as -> its module class
    "decoder": "train.modules.decoder.DecoderModule",
    "prior": "train.modules.prior.PriorModule",
    "upsampler": "train.modules.upsampler.UpsamplerModule",
}


def load_module(path: str | Path, role: str | None = None, **overrides):
    """The stage's LightningModule with its EMA weights (as ``net`` and ``ema.shadow``), in eval mode.
    ``role``: what it is loaded as (a key of ROLES), checked first; ``overrides`` replace module
    constructor arguments (e.g. ``clip_ckpt``)."""
    stage = load_stage(path)
    target = stage.cfg.module.get("_target_", "")
    if role is not None and target != ROLES[role]:
        found = next((name for name, cls in ROLES.items() if cls == target), target.rsplit(".", 1)[-1])
        a = {word: "an" if word[:1] in "aeiou" else "a" for word in (found, role)}
        raise ValueError(
            f"{role}={path}: {a[found]} {found} run, expected {a[role]} {role} run (module {target})"
        )
    kwargs = {"net": stage.net, "tokenizer": stage.tokenizer, **overrides}
    module = instantiate(stage.cfg.module, _convert_="all", **kwargs)
    module.run_dir = Path(path)
    module.trained_with_clip = stage.cfg.get("clip_ckpt")  # the CLIP it was trained with, as recorded
    module.trained_with_clip_weights = OmegaConf.to_container(
        stage.cfg.get("clip_weights") or OmegaConf.create()
    )
    return module.eval().requires_grad_(False)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between unit vectors ``a`` and ``b`` (…, D) at ``t`` in [0, 1]."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return torch.sin((1 - t) * omega) / so * a + torch.sin(t * omega) / so * b


DECODER_CONDITIONS = ("both", "caption", "image")
PRECISIONS = ("auto", "bf16", "fp32")  # what the diffusion nets sample in (Cascade precision=)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device that has it (as the stages trained, bf16-mixed), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


@dataclass
class StageSettings:
    """Sampling settings of one stage (None: the stage's own config, ``module.*``)."""

    steps: int | None = None
    sampler: str = "ddim"  # ddim | ddpm | dpmpp_2m (DPM-Solver++(2M): as good in fewer steps)
    eta: float | None = None  # DDIM only
    guidance_scale: float | None = None  # prior and decoder
    best_of: int | None = None  # prior only
    condition: str = "both"  # decoder only: both (image embedding and caption) | caption | image

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r}: expected one of {list(SAMPLERS)}")
        if self.condition not in DECODER_CONDITIONS:
            raise ValueError(f"condition={self.condition!r}: expected one of {list(DECODER_CONDITIONS)}")
        if self.eta and self.sampler != "ddim":  # (it was ignored)
            raise ValueError(
                f"eta={self.eta}: the noise of a DDIM step, which sampler={self.sampler!r} does not take "
                "(ddpm adds the posterior's noise, dpmpp_2m none): sample with ddim, or leave eta out"
            )


@dataclass
class CascadeOutput:
    images: torch.Tensor  # uint8 (B, 3, H, W): the last stage's output
    stages: list[torch.Tensor] = field(default_factory=list)  # uint8, every stage's output, decoder first
    image_emb: torch.Tensor | None = None  # (B, D): what the decoder was conditioned on


class Inpainter:
    """``step_callback`` for a sampling loop that keeps the known region of ``known`` (x0, in the loop's
    variable) where ``mask`` is 1: after each step to t-1, those pixels are the known x0 noised to t-1."""

    def __init__(
        self,
        process: GaussianDiffusion,
        known: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None,
    ) -> None:
        self.process, self.known, self.mask, self.generator = process, known, mask, generator

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i == 0:
            noised = self.known
        else:
            t = torch.full((x.shape[0],), i - 1, device=x.device, dtype=torch.long)
            noise = GaussianDiffusion._noise(x.shape, x.device, self.generator)
            noised = self.process.q_sample(self.known, t, noise)
        return self.mask * noised + (1 - self.mask) * x


UPSAMPLER_STAGES = ("upsampler_256", "upsampler_1024")


def stage_dir(root: Path, name: str) -> Path | None:
    """A pipeline stage's inference export if present, else its run directory, else None."""
    for candidate in (root / name / "export", root / name):
        if (candidate / "config.yaml").exists():
            return candidate
    return None


class Cascade:
    def __init__(
        self,
        decoder: DecoderModule,
        prior=None,
        upsamplers: Sequence[UpsamplerModule] = (),
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ) -> None:
        """``precision``: the prior, decoder and upsamplers run under bf16 autocast or in fp32 (``auto``:
        bf16 on a GPU that has it, as they were trained; fp32 on the CPU). The diffusion arithmetic around
        each net call and the CLIP embeddings stay fp32."""
        self.decoder, self.prior, self.upsamplers = decoder, prior, list(upsamplers)
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        for m in (decoder, prior, *self.upsamplers):
            if m is not None:
                m.to(self.device)
        self.clip: FrozenClip = decoder.clip()
        if prior is not None and prior.net.embed_dim != self.clip.embed_dim:
            raise ValueError(
                f"prior {getattr(prior, 'run_dir', '')} predicts {prior.net.embed_dim}-d embeddings but the "
                f"decoder's CLIP ({self.clip.run}) has {self.clip.embed_dim}: they were trained on different CLIPs"
            )
        _check_clip(decoder, "decoder", self.clip)
        if prior is not None:
            _check_clip(prior, "prior", self.clip)
        size, where = decoder.net.image_size, f"decoder {getattr(decoder, 'run_dir', '')}"
        for up in self.upsamplers:
            if up.hparams.low_res_size != size:
                raise ValueError(
                    f"upsampler {getattr(up, 'run_dir', '')} takes {up.hparams.low_res_size} px inputs but "
                    f"{where} outputs {size} px: list the upsamplers in order (e.g. 64->256, then 256->1024)"
                )
            size, where = up.net.image_size, f"upsampler {getattr(up, 'run_dir', '')}"

    @classmethod
    def load(
        cls,
        decoder: str | Path,
        prior: str | Path | None = None,
        upsamplers: Sequence[str | Path] = (),
        clip: str | Path | None = None,
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ) -> Cascade:
        """From run directories (or checkpoints, or inference exports). ``clip``: the CLIP run, when the
        decoder's ``clip_ckpt`` no longer points at it (moved or exported)."""
        # (clip: in place of the decoder's own; refused, as another CLIP for a prior, when its weights are not
        # those the decoder trained with)
        recorded = None if clip else _moved_clip(decoder)
        if recorded:  # (it failed deep in the module's instantiation)
            raise FileNotFoundError(
                f"decoder {decoder} was trained with the CLIP {recorded}, which is not there (moved?): give "
                "its path now, clip= (--clip), checked against the weights the decoder trained with"
            )
        dec = load_module(decoder, "decoder", **({"clip_ckpt": str(clip)} if clip else {}))
        pri = None
        if prior is not None:  # embeddings come from the decoder's CLIP, so the prior needs none of its own
            pri = load_module(prior, "prior", clip_ckpt=None, tokenizer=dec.clip().tokenizer)
        ups = [load_module(p, "upsampler") for p in upsamplers]
        return cls(dec, pri, ups, device=device, precision=precision)

    @classmethod
    def from_dir(
        cls,
        root: str | Path | None,
        *,
        prior: str | Path | None = None,
        decoder: str | Path | None = None,
        upsamplers: Sequence[str | Path] = (),
        clip: str | Path | None = None,
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ) -> Cascade:
        """From a train.pipeline output directory ``root`` (its ``prior``, ``decoder``, ``upsampler_256``
        and ``upsampler_1024`` stages, each an ``export/`` or a run directory); stages given explicitly
        take precedence, and without ``root`` they are all there is. A decoder whose CLIP is no longer
        where it was recorded (the directory moved whole) takes ``root``'s ``clip`` stage, whose weights
        must be those it trained with."""
        ups = list(upsamplers)
        if root is not None:
            root = Path(root)
            if not root.is_dir():
                raise FileNotFoundError(
                    f"--cascade {root}: not a directory (a train.pipeline output directory)"
                )
            prior = prior or stage_dir(root, "prior")
            decoder = decoder or stage_dir(root, "decoder")
            if clip is None and decoder is not None and _moved_clip(decoder):  # the directory moved whole:
                clip = stage_dir(root, "clip")  # its own CLIP (weights checked; None: the error names --clip)
            ups = ups or [d for d in (stage_dir(root, n) for n in UPSAMPLER_STAGES) if d is not None]
        if decoder is None:
            raise FileNotFoundError(
                "no decoder: give --cascade DIR (with DIR/decoder) or --decoder RUN"
                + (f"; {root}/decoder has no config.yaml" if root is not None else "")
            )
        return cls.load(decoder, prior=prior, upsamplers=ups, clip=clip, device=device, precision=precision)

    @property
    def image_size(self) -> int:
        return self.upsamplers[-1].net.image_size if self.upsamplers else self.decoder.net.image_size

    # ---- building blocks --------------------------------------------------------------------------
    def tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.clip.tokenizer(list(prompts)).to(self.device)

    def text(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """CLIP text embedding, token features and tokens of ``prompts``."""
        tokens = self.tokens(prompts)
        emb = self.clip.embed(None, tokens)
        return {"txt_emb": emb["txt_emb"], "txt_feat": emb["txt_feat"], "tokens": tokens}

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> L2-normalised CLIP image embeddings (B, D)."""
        return self.clip.embed(images.to(self.device), None)["img_emb"]

    def prior_sample(
        self, text: dict[str, torch.Tensor], settings: StageSettings, generator: torch.Generator
    ) -> torch.Tensor:
        if self.prior is None:
            log.warning("no prior in this cascade: decoding from the CLIP text embedding itself")
            return text["txt_emb"]
        with self.autocast():  # (the samplers return float32 whatever the nets compute in)
            return self.prior.sample(
                text,
                guidance_scale=settings.guidance_scale,
                best_of=settings.best_of,
                generator=generator,
                steps=settings.steps,
                sampler=settings.sampler,
            )

    def decode(
        self,
        image_emb: torch.Tensor,
        text: dict[str, torch.Tensor] | None,
        settings: StageSettings,
        generator: torch.Generator,
        noise: torch.Tensor | None = None,
        step_callback=None,
    ) -> torch.Tensor:
        """Decoder images in [-1, 1]; ``text=None`` decodes from the image embedding alone, as does
        ``settings.condition="image"``; ``"caption"`` from the caption alone (the embedding is dropped)."""
        cond, drop_text, drop_image = self._decoder_conditioning(image_emb, text, settings)
        with self.autocast():
            return self.decoder.sample(
                cond,
                guidance_scale=settings.guidance_scale,
                generator=generator,
                steps=settings.steps,
                sampler=settings.sampler,
                eta=settings.eta,
                noise=noise,
                drop_text=drop_text,
                drop_image=drop_image,
                step_callback=step_callback,
            )

    def _decoder_conditioning(
        self, image_emb: torch.Tensor, text: dict[str, torch.Tensor] | None, settings: StageSettings
    ) -> tuple[dict[str, torch.Tensor], bool, bool]:
        """The decoder's conditioning for ``settings.condition``, and whether the caption and the image
        embedding are dropped from it."""
        if settings.condition == "image":
            text = None
        if text is None:  # the caption is dropped (null tokens), so any tokens of the right shape do
            cond = self.decoder.conditioning(image_emb, self.tokens([""] * image_emb.shape[0]))
        else:
            cond = self.decoder.conditioning(image_emb, text["tokens"], text["txt_feat"])
        return cond, text is None, settings.condition == "caption"

    def upsample(
        self,
        x: torch.Tensor,
        settings: Sequence[StageSettings],
        generator: torch.Generator,
        known: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        progress: Progress | None = None,
        shared_noise: bool = False,
    ) -> list[torch.Tensor]:
        """Each upsampler in turn on ``x`` in [-1, 1]; returns every output. With ``known`` (uint8 at any
        size) and ``mask`` (1 = keep), each stage keeps the known region (inpainting). ``shared_noise``:
        every row starts from the same noise at each stage (interpolation)."""
        outs = []
        for up, s in zip(self.upsamplers, settings):
            x = x.clamp(-1, 1)
            callback = None
            if known is not None:
                size = x.shape[-1] * up.net.image_size // up.hparams.low_res_size
                target = to_unit_range(known.to(self.device), size)
                if up.hparams.residual:
                    target = target - up.base(x, size)
                process = up.sampler if s.steps is None else up.diffusion.respace(s.steps)
                callback = Inpainter(process, target, resize_mask(mask, size), generator)
            with self.autocast():
                x = up.upsample(
                    x,
                    generator,
                    steps=s.steps,
                    sampler=s.sampler,
                    eta=s.eta,
                    step_callback=callback,
                    shared_noise=shared_noise,
                )
            outs.append(x)
            if progress is not None:
                progress.step(detail=f"upsampler to {x.shape[-1]} px")
        return outs

    def autocast(self):
        """The context the diffusion nets sample in: bf16 autocast under ``precision=bf16``."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _settings(self, stages: Sequence[StageSettings] | None, n: int) -> list[StageSettings]:
        stages = list(stages or [])
        return stages + [StageSettings() for _ in range(n - len(stages))]

    def _progress(self, what: str, images: int, prior: bool) -> Progress:
        """A log line after each stage of the cascade, with the time left (sampling is where users wait)."""
        stages = int(prior and self.prior is not None) + 1 + len(self.upsamplers)
        return Progress(stages, f"{what} ({images} images)", unit="stages", log=log)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    def _finish(self, base: torch.Tensor, ups: list[torch.Tensor], image_emb: torch.Tensor) -> CascadeOutput:
        stages = [to_uint8(x.clamp(-1, 1)).cpu() for x in (base, *ups)]
        return CascadeOutput(images=stages[-1], stages=stages, image_emb=image_emb.cpu())

    # ---- the four uses ----------------------------------------------------------------------------
    @torch.no_grad()
    def text_to_image(
        self,
        prompts: Sequence[str],
        *,
        prior: StageSettings | None = None,
        decoder: StageSettings | None = None,
        upsamplers: Sequence[StageSettings] | None = None,
        seed: int = 0,
    ) -> CascadeOutput:
        g = self._generator(seed)
        progress = self._progress("text to image", len(prompts), prior=True)
        text = self.text(prompts)
        image_emb = self.prior_sample(text, prior or StageSettings(), g)
        if self.prior is not None:
            progress.step(detail="prior")
        base = self.decode(image_emb, text, decoder or StageSettings(), g)
        progress.step(detail=f"decoder at {base.shape[-1]} px")
        ups = self.upsample(base, self._settings(upsamplers, len(self.upsamplers)), g, progress=progress)
        return self._finish(base, ups, image_emb)

    @torch.no_grad()
    def variations(
        self,
        images: torch.Tensor,
        n: int = 4,
        *,
        eta: float = 0.8,
        invert: bool = False,
        decoder: StageSettings | None = None,
        upsamplers: Sequence[StageSettings] | None = None,
        seed: int = 0,
    ) -> CascadeOutput:
        """``n`` variations of each uint8 image (B, 3, H, W), in order image 0's n, image 1's n, ...

        The decoder sees only the CLIP image embedding (caption dropped) and samples by DDIM with ``eta``
        (> 0: variations differ). ``invert``: start from the DDIM inversion of the image instead of noise,
        which keeps its layout (the paper's Figure 3 with eta > 0); it runs the decoding's ODE backwards,
        at its guidance scale, so that eta 0 decodes the image again."""
        g = self._generator(seed)
        settings = decoder or StageSettings()
        _ddim_only("variations", settings)
        _embedding_only("variations", settings)
        if settings.eta is not None and settings.eta != eta:
            raise ValueError(f"variations: eta={eta} and the decoder settings' eta={settings.eta}: give one")
        emb = self.image_embedding(images).repeat_interleave(n, 0)
        noise = self.invert(images, emb[::n], settings).repeat_interleave(n, 0) if invert else None
        progress = self._progress("variations", len(emb), prior=False)
        base = self.decode(
            emb, None, StageSettings(settings.steps, "ddim", eta, settings.guidance_scale), g, noise=noise
        )
        progress.step(detail=f"decoder at {base.shape[-1]} px")
        ups = self.upsample(base, self._settings(upsamplers, len(self.upsamplers)), g, progress=progress)
        return self._finish(base, ups, emb)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, emb: torch.Tensor, settings: StageSettings) -> torch.Tensor:
        """The decoder's DDIM inversion of uint8 ``images`` (B, 3, H, W) under their image embeddings
        ``emb`` (caption dropped): the x_T from which DDIM at eta 0, with the same steps and guidance scale
        (``settings``, default the stage's), decodes them again."""
        x0 = to_unit_range(images.to(self.device), self.decoder.net.image_size)
        cond, uncond = self.decoder.guided(
            self.decoder.conditioning(emb, self.tokens([""] * len(images))), drop_text=True
        )
        process = self.decoder.diffusion.respace(settings.steps or self.decoder.hparams.sample_steps)
        scale = settings.guidance_scale
        scale = self.decoder.hparams.guidance_scale if scale is None else scale
        with self.autocast():
            return process.ddim_encode(
                self.decoder.ema.shadow, x0, model_kwargs=cond, guidance_scale=scale, uncond_kwargs=uncond
            )

    @torch.no_grad()
    def text_diff(
        self,
        image: torch.Tensor,
        source: str,
        target: str,
        n: int = 5,
        *,
        max_theta: float = 0.5,
        decoder: StageSettings | None = None,
        upsamplers: Sequence[StageSettings] | None = None,
        seed: int = 0,
    ) -> CascadeOutput:
        """The paper's text diffs (Ramesh et al. 2022, section 3.3, Figure 5): uint8 ``image`` (3, H, W),
        described by the caption ``source``, changed toward ``target``. Its CLIP image embedding is slerped
        toward the text diff, the normalised difference of the two captions' text embeddings, by ``n``
        fractions of the angle between them from 0 to ``max_theta`` (the paper: up to 0.5); every frame is
        decoded from the image's DDIM inversion at eta 0 and upsampled with shared noise, so the first
        frame is the image itself, as far as the cascade reconstructs it."""
        settings = decoder or StageSettings()
        _frames_only("text diffs", settings)
        if not 0 < max_theta <= 1:
            raise ValueError(f"text diffs: max_theta={max_theta}: expected a fraction of the angle in (0, 1]")
        g = self._generator(seed)
        z_image = self.image_embedding(image[None])
        texts = self.text([source, target])["txt_emb"]
        if torch.equal(texts[0], texts[1]):
            raise ValueError(f"text diffs: {source!r} and {target!r} have one text embedding: no direction")
        z_diff = F.normalize(texts[1] - texts[0], dim=-1)
        path = torch.stack([slerp(z_image[0], z_diff, max_theta * k / max(1, n - 1)) for k in range(n)])
        noise = self.invert(image[None], z_image, settings).expand(n, -1, -1, -1).contiguous()
        return self._frames("text diffs", path, noise, settings, upsamplers, g)

    def _frames(
        self,
        what: str,
        path: torch.Tensor,
        noise: torch.Tensor,
        settings: StageSettings,
        upsamplers: Sequence[StageSettings] | None,
        generator: torch.Generator,
    ) -> CascadeOutput:
        """Image embeddings ``path`` (n, D) decoded from the one ``noise`` by DDIM at eta 0 and upsampled
        with shared noise: frames that differ by their embeddings only (interpolation, text diffs)."""
        progress = self._progress(what, len(path), prior=False)
        ddim = StageSettings(settings.steps, "ddim", 0.0, settings.guidance_scale)
        base = self.decode(path, None, ddim, generator, noise)
        progress.step(detail=f"decoder at {base.shape[-1]} px")
        stages = self._settings(upsamplers, len(self.upsamplers))
        ups = self.upsample(base, stages, generator, progress=progress, shared_noise=True)
        return self._finish(base, ups, path)

    @torch.no_grad()
    def inpaint(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        prompts: Sequence[str],
        *,
        resample: int = 0,
        prior: StageSettings | None = None,
        decoder: StageSettings | None = None,
        upsamplers: Sequence[StageSettings] | None = None,
        seed: int = 0,
    ) -> CascadeOutput:
        """Fill where ``masks`` (B, 1, H, W) or (B, H, W) is 0 (1 = keep the uint8 ``images``' pixels),
        following ``prompts``. The decoder is conditioned on the prompt's caption and on the prior's
        image embedding for it. ``resample``: extra renoise-denoise passes per decoder step."""
        if images.shape[0] != masks.shape[0] or images.shape[0] != len(prompts):
            raise ValueError(
                f"inpaint: {images.shape[0]} images, {masks.shape[0]} masks and {len(prompts)} prompts: "
                "expected one of each per sample"
            )
        g = self._generator(seed)
        masks = masks.float().view(masks.shape[0], 1, *masks.shape[-2:]).to(self.device)
        progress = self._progress("inpainting", len(prompts), prior=True)
        text = self.text(prompts)
        image_emb = self.prior_sample(text, prior or StageSettings(), g)
        if self.prior is not None:
            progress.step(detail="prior")
        settings = decoder or StageSettings()
        if resample and settings.sampler != "ddim":
            raise ValueError(
                f"inpaint: resample={resample} steps the decoder with DDIM; sampler={settings.sampler!r} "
                "(--decoder-sampler) would be ignored: use ddim, or resample=0"
            )
        size = self.decoder.net.image_size
        known = to_unit_range(images.to(self.device), size)
        mask = resize_mask(masks, size)
        process = self.decoder.diffusion.respace(settings.steps or self.decoder.hparams.sample_steps)
        keep = Inpainter(process, known, mask, g)
        if resample:
            with self.autocast():
                base = self._inpaint_resampled(process, image_emb, text, settings, keep, resample, g)
        else:
            base = self.decode(image_emb, text, settings, g, step_callback=keep)
        progress.step(detail=f"decoder at {base.shape[-1]} px")
        ups = self.upsample(
            base, self._settings(upsamplers, len(self.upsamplers)), g, images, masks, progress=progress
        )
        return self._finish(base, ups, image_emb)

    def _inpaint_resampled(self, process, image_emb, text, settings, keep, passes, g) -> torch.Tensor:
        """Decoder inpainting where each step is repeated ``passes`` more times: denoise t -> t-1, keep the
        known region, renoise t-1 -> t (forward one step), and denoise again."""
        dec = self.decoder
        cond, drop_text, drop_image = self._decoder_conditioning(image_emb, text, settings)  # as decode's
        b = image_emb.shape[0]
        cond, uncond = dec.guided(cond, drop_image=drop_image, drop_text=drop_text)
        scale = dec.hparams.guidance_scale if settings.guidance_scale is None else settings.guidance_scale
        eta = dec.hparams.eta if settings.eta is None else settings.eta
        net = dec.ema.shadow
        x = GaussianDiffusion._noise((b, 3, net.image_size, net.image_size), self.device, g)
        kw = dict(model_kwargs=cond, guidance_scale=scale, uncond_kwargs=uncond)
        for i in range(process.num_timesteps - 1, -1, -1):
            t = torch.full((b,), i, device=self.device, dtype=torch.long)
            for p in range(passes + 1):
                x_prev = keep(i, process.ddim_step(net, x, t, eta=eta, generator=g, **kw)["sample"])
                if p == passes or i == 0:
                    break
                ratio = process.alphas_cumprod[i] / process.alphas_cumprod[i - 1]  # alpha_t of the step
                noise = GaussianDiffusion._noise(x.shape, self.device, g)
                x = ratio.sqrt() * x_prev + (1 - ratio).sqrt() * noise
            x = x_prev
        return x

    @torch.no_grad()
    def interpolate(
        self,
        image_a: torch.Tensor,
        image_b: torch.Tensor,
        n: int = 5,
        *,
        invert: bool = False,
        decoder: StageSettings | None = None,
        upsamplers: Sequence[StageSettings] | None = None,
        seed: int = 0,
    ) -> CascadeOutput:
        """``n`` images along the slerp from uint8 ``image_a`` (3, H, W) to ``image_b``'s CLIP embedding,
        decoded with the same noise (DDIM, eta 0), and upsampled with the same noise, so that only the
        embedding changes. ``invert``: each frame's decoder noise is slerped too, from ``image_a``'s DDIM
        inversion to ``image_b``'s (the norm interpolated linearly), so that the end frames are the two
        images as the cascade reconstructs them (``variations(invert=True, eta=0)``) and the frames between
        keep their layouts, as in the paper's interpolations from inverted latents."""
        settings = decoder or StageSettings()
        _frames_only("interpolation", settings)
        g = self._generator(seed)
        emb = torch.cat([self.image_embedding(image[None]) for image in (image_a, image_b)])  # any sizes
        path = torch.stack([slerp(emb[0], emb[1], t / max(1, n - 1)) for t in range(n)])
        if invert:
            ends = [
                self.invert(image[None], emb[i : i + 1], settings)[0]
                for i, image in enumerate((image_a, image_b))
            ]
            noise = torch.stack([_slerp_latent(*ends, t, n) for t in range(n)])
        else:
            size = self.decoder.net.image_size
            noise = (
                GaussianDiffusion._noise((1, 3, size, size), self.device, g)
                .expand(n, -1, -1, -1)
                .contiguous()
            )
        return self._frames("interpolation", path, noise, settings, upsamplers, g)


def _slerp_latent(a: torch.Tensor, b: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Frame ``k`` of ``n`` between latents ``a`` and ``b``: the direction slerped, the norm interpolated
    linearly; the end frames are ``a`` and ``b`` themselves."""
    if k == 0 or n == 1:
        return a
    if k == n - 1:
        return b
    t = k / (n - 1)
    norm = (1 - t) * a.float().norm() + t * b.float().norm()
    return (slerp(a.flatten(), b.flatten(), t) * norm).view_as(a).to(a.dtype)


def _check_clip(module, role: str, clip: FrozenClip) -> None:
    """A prior's embeddings and a decoder's conditioning mean something only to the CLIP weights they were
    learned from: another CLIP's weights (of the same size: nothing else fails) make poor samples. Refused
    where the stage's config records the weights it trained with (``clip_weights``: train/run.py
    record_clip) and ``clip`` has others: another CLIP, or the CLIP run named by the stage's
    ``clip_ckpt`` trained on since. Warned for a stage trained before weights were recorded whose
    ``clip_ckpt`` names another run."""
    where = f"{role} {getattr(module, 'run_dir', '')}"
    reads = "the decoder reads" if role == "prior" else "reads"
    recorded = getattr(module, "trained_with_clip_weights", None) or {}
    if recorded.get("digest"):
        if not clip.has_weights(recorded["digest"]):
            remedy = (
                "Train the prior on this CLIP's embeddings, or take the decoder trained with the prior's CLIP"
                if role == "prior"
                else "Give the cascade the CLIP it trained with (clip=, --clip), or train the decoder with this one"
            )
            raise ValueError(
                f"{where} was trained with the CLIP weights of {recorded.get('checkpoint')} (step "
                f"{recorded.get('global_step')}), and {reads} other weights, {clip.checkpoint} (step "
                f"{clip.global_step}): its {'embeddings mean' if role == 'prior' else 'conditioning means'} "
                f"something only to the CLIP it learned them from. {remedy}"
            )
        return
    trained_with = getattr(module, "trained_with_clip", None)
    if _other_clip(trained_with, clip.run):
        log.warning(
            "%s was trained with the CLIP %s, and %s %s: its %s mean something only to the CLIP it learned "
            "them from (same size, other weights: poor samples)",
            where,
            trained_with,
            reads,
            clip.run,
            "embeddings" if role == "prior" else "image embeddings",
        )


def _moved_clip(decoder: str | Path) -> str | None:
    """The CLIP a decoder's config records (``clip_ckpt``) when it is no longer there, else None."""
    from train.checkpoint import config_dir_of

    recorded = OmegaConf.load(config_dir_of(decoder) / "config.yaml").get("clip_ckpt")
    return recorded if recorded and not Path(recorded).exists() else None


def _other_clip(recorded: str | None, clip_run: Path) -> bool:
    """Whether a stage's recorded CLIP (a run directory or a checkpoint in one) is another run than
    ``clip_run``; False when it cannot tell (nothing recorded, or moved since)."""
    if not recorded or not Path(recorded).exists() or not Path(clip_run).exists():
        return False
    return owner_of(recorded) != owner_of(clip_run)


def _embedding_only(mode: str, settings: StageSettings) -> None:
    """Variations and interpolation decode from the image embedding alone: another decoder condition
    asked for is refused, not ignored."""
    if settings.condition != "both":
        raise ValueError(
            f"{mode}: the decoder sees the image embedding alone here (no caption); "
            f"condition={settings.condition!r} (--decoder-condition) would be ignored: leave it out"
        )


def _frames_only(mode: str, settings: StageSettings) -> None:
    """Interpolation and text diffs decode every frame from the image embedding alone by DDIM at eta 0
    (:meth:`Cascade._frames`): another sampler, condition or eta asked for is refused, not ignored."""
    _ddim_only(mode, settings)
    _embedding_only(mode, settings)
    if settings.eta:
        raise ValueError(
            f"{mode}: the decoder steps by DDIM at eta 0 (one path of noise for every frame); "
            f"eta={settings.eta} would be ignored: leave it out"
        )


def _ddim_only(mode: str, settings: StageSettings) -> None:
    """Variations and interpolation step the decoder with DDIM (their eta, and the inversion, are DDIM's):
    another sampler asked for is refused, not ignored."""
    if settings.sampler != "ddim":
        raise ValueError(
            f"{mode}: the decoder samples with DDIM here; sampler={settings.sampler!r} (--decoder-sampler) "
            "would be ignored: use ddim"
        )


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, H, W) float mask -> (B, 1, size, size), 1 only where the whole area was known (a pixel
    is kept only if everything it covers is kept: no half-known pixels)."""
    if tuple(mask.shape[-2:]) == (size, size):
        return mask
    if min(mask.shape[-2:]) >= size:
        return -F.adaptive_max_pool2d(-mask, size)  # min pooling
    return F.interpolate(mask, size=(size, size), mode="nearest")

"""Multimodal LLM captioners: XPSR's high-level (content) and low-level (quality) text prompts.

References: XPSR (Qu et al., ECCV 2024) and its scripts qyp2000/XPSR
``utils_data/{high,low}level_prompt_{train,test}.py`` (docs/references.md). XPSR pre-computes two texts per
image with MLLMs and stores them as plain text beside the data set:

- high-level: ``llava-hf/llava-1.5-7b-hf`` (fp16, ``LlavaForConditionalGeneration`` + ``AutoProcessor``),
  prompt ``"<image>\\nUSER: Please provide a descriptive summary of the content of this image.
  \\nASSISTANT:"`` (one line), default decoding (no sampling arguments: greedy with this checkpoint's
  generation config), ``max_length=200``; the text after ``"ASSISTANT:"`` is kept, newlines become spaces;
- low-level: Q-Instruct ``internlm-xcomposer-vl-7b-qinstruct-full`` (``trust_remote_code``), query
  ``"Describe and evaluate the quality of the image."``. That model does not run with current dependencies
  (quyp2000/XPSR#8), so here the low-level captioner is any LLaVA-1.5-class checkpoint in the
  Hugging Face layout asked the Q-Instruct query (``configs/method/captioner/qinstruct.yaml``).

DreamClear (Ai et al., NeurIPS 2024; shallowdream204/DreamClear ``llava/llava_caption.py``, used by ``test.py``)
captions its reference restoration with LLaVA-1.6-vicuna-13B (``LlavaNextForConditionalGeneration`` once
converted to the Hugging Face layout: ``llava-hf/llava-v1.6-vicuna-13b-hf``): the ``llava_v1`` conversation
(:data:`LLAVA_V1_PROMPT_TEMPLATE`) asking :data:`DREAMCLEAR_INSTRUCTION`, sampled with temperature 0.2 and
top-p 0.7, at most 512 new tokens, fp16, newlines -> spaces (``configs/method/captioner/dreamclear_llava.yaml``).

:class:`MLLMCaptioner` is one model + processor + one instruction (any LLaVA-class checkpoint loaded through
``AutoModelForImageTextToText``); :func:`tiny_llava` (LLaVA-1.5) and :func:`tiny_llava_next` (LLaVA-NeXT)
build the same classes from configs in code (random weights, offline tokenizer) so tests run the real code
path (processor -> generate -> decode) on a CPU in milliseconds. Captions are pre-computed into JSONL side-files by
``scripts/extract_prompts.py`` (:mod:`restore.data.prompt_extraction`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from restore.models.priors import hub_cache_fix, loading_mode

__all__ = [
    "DREAMCLEAR_INSTRUCTION",
    "HIGHLEVEL_INSTRUCTION_OFFICIAL",
    "HIGHLEVEL_INSTRUCTION_PAPER",
    "LLAVA15_PROMPT_TEMPLATE",
    "LLAVA_V1_PROMPT_TEMPLATE",
    "LOWLEVEL_INSTRUCTION_OFFICIAL",
    "LOWLEVEL_INSTRUCTION_PAPER",
    "OFFICIAL_MAX_LENGTH",
    "CaptionerNotFoundError",
    "MLLMCaptioner",
    "tiny_llava",
    "tiny_llava_next",
]

#: The high-level instruction as the XPSR paper (Qu et al., ECCV 2024) words it.
HIGHLEVEL_INSTRUCTION_PAPER = "Please provide a descriptive summary of the content of this image"
#: The same as the official script sends it, with a final "."
#: (XPSR ``utils_data/highlevel_prompt_{train,test}.py``).
HIGHLEVEL_INSTRUCTION_OFFICIAL = HIGHLEVEL_INSTRUCTION_PAPER + "."
#: The low-level instruction as the XPSR paper words it.
LOWLEVEL_INSTRUCTION_PAPER = (
    "Please describe the quality of this image and evaluate it based on factors such as clarity, color, "
    "noise, and lighting"
)
#: The Q-Instruct query of the official ``utils_data/lowlevel_prompt_{train,test}.py``.
LOWLEVEL_INSTRUCTION_OFFICIAL = "Describe and evaluate the quality of the image."
#: LLaVA-1.5's single-turn prompt as XPSR writes it (``highlevel_prompt_{train,test}.py``); with the official
#: instruction it is exactly
#: ``"<image>\nUSER: Please provide a descriptive summary of the content of this image. \nASSISTANT:"``.
LLAVA15_PROMPT_TEMPLATE = "<image>\nUSER: {instruction} \nASSISTANT:"
#: LLaVA's ``llava_v1`` conversation (haotian-liu/LLaVA ``llava/conversation.py``, ``conv_llava_v1``; the copy in
#: shallowdream204/DreamClear ``llava/conversation.py``) with one user turn, the image first, as the original
#: ``conv.get_prompt()`` writes it for LLaVA-1.5/1.6-vicuna checkpoints: system text, ``" USER: <image>\n"``,
#: the instruction, ``" ASSISTANT:"``. It is also the prompt ``llava-hf/llava-v1.6-vicuna-*-hf`` documents.
LLAVA_V1_PROMPT_TEMPLATE = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: <image>\n{instruction} ASSISTANT:"
)
#: DreamClear's query for the caption of the reference restoration (shallowdream204/DreamClear ``test.py``).
DREAMCLEAR_INSTRUCTION = "Describe this image and its style."
#: The official ``generate(max_length=200)`` (``highlevel_prompt_{train,test}.py``). With transformers 4.36
#: the prompt held one ``<image>`` token: the budget for new tokens was 200 minus the prompt's length,
#: ``<image>`` counted once.
OFFICIAL_MAX_LENGTH = 200

# What a LLaVA checkpoint folder in the Hugging Face layout holds, for the error message of a missing model.
_EXPECTED_FILES = (
    "config.json, generation_config.json  (LlavaConfig or LlavaNextConfig: vision_config + text_config)",
    "model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json",
    "preprocessor_config.json and/or processor_config.json (CLIPImageProcessor + LlavaProcessor, or "
    "LlavaNextImageProcessor + LlavaNextProcessor)",
    "tokenizer.json or tokenizer.model, tokenizer_config.json, special_tokens_map.json",
)


class CaptionerNotFoundError(FileNotFoundError):
    """An MLLM captioner could not be loaded from the local folder / the offline Hugging Face cache."""


def _missing_message(source: str, offline: bool, err: BaseException) -> str:
    layout = "\n".join(f"  {source}/{files}" for files in _EXPECTED_FILES)
    return (
        f"cannot load the captioner {source!r} ({loading_mode(offline)}): {type(err).__name__}: {err}\n"
        "Expected either a local folder in the Hugging Face LLaVA layout (LLaVA-1.5: "
        "LlavaForConditionalGeneration + LlavaProcessor, as llava-hf/llava-1.5-7b-hf; LLaVA-NeXT/1.6: "
        f"LlavaNextForConditionalGeneration + LlavaNextProcessor, as llava-hf/llava-v1.6-vicuna-13b-hf):\n"
        f"{layout}\n{hub_cache_fix(source)} Checkpoints in the original LLaVA repository format "
        "(LlavaLlamaForCausalLM with mm_projector weights, e.g. teowu/llava_v1.5_7b_qinstruct_preview_v0.1 or "
        "liuhaotian/llava-v1.6-vicuna-13b) must first be converted to this layout (transformers' "
        "convert_llava_weights_to_hf.py / convert_llava_next_weights_to_hf.py)."
    )


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"float16"`` / ``"torch.float16"`` (Hydra passes strings) -> ``torch.float16``; dtypes, None pass."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r} (e.g. float16, bfloat16, float32)")
    return value


def _to_uint8_images(images: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """``[B, 3, H, W]`` (or a list of ``[3, H, W]``, sizes may differ) in [0, 1] -> CPU uint8 ``[3, H, W]``.

    The official script hands 8-bit PIL images to the processor; rounding to 8 bits here gives the processor
    the same input (lossless for 8-bit files) and its usual ``1/255`` rescale.
    """
    items = list(images.unbind(0)) if isinstance(images, Tensor) else list(images)
    out = []
    for i, img in enumerate(items):
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"image {i}: expected [3, H, W] in [0, 1], got shape {tuple(img.shape)}")
        out.append((img.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu())
    return out


def _int8_loading(device: torch.device | str | None) -> dict[str, Any]:
    """``from_pretrained`` arguments for LLM.int8 weights on ``device``, or a clear error where they cannot run."""
    if device is None or torch.device(device).type != "cuda":
        raise ValueError(
            f"load_in_8bit needs a CUDA device for the captioner (got device={device!r}): set "
            "captioner.device=cuda:0 (or cuda:1 to keep it off the diffusion GPU)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError("load_in_8bit needs bitsandbytes: pip install bitsandbytes") from err
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": str(device)}}


class MLLMCaptioner(nn.Module):
    """A LLaVA-class image-text-to-text model, its processor and one instruction: images -> one text each.

    ``prompt_template`` holds ``{instruction}``; the default is LLaVA-1.5's as XPSR writes it
    (:data:`LLAVA15_PROMPT_TEMPLATE`), DreamClear's is :data:`LLAVA_V1_PROMPT_TEMPLATE`. What follows
    ``{instruction}`` in the template (``"ASSISTANT:"`` in both) marks where the answer starts: XPSR's script keeps
    the decoded text after the last occurrence of it (``highlevel_prompt_{train,test}.py``), which is what
    :meth:`caption` returns, newlines replaced by spaces and stripped. ``max_new_tokens=None`` is XPSR's
    budget: :data:`OFFICIAL_MAX_LENGTH` tokens in all, prompt included with ``<image>`` counted once.

    Decoding: ``temperature=0`` is greedy (XPSR's); ``temperature > 0`` samples with that temperature and
    ``top_p`` (``None``: the checkpoint's generation config; DreamClear's ``llava/llava_caption.py`` samples with
    0.2 and 0.7). Sampling is reproducible: each :meth:`caption` call draws from generators seeded with
    ``seed`` inside :func:`torch.random.fork_rng`, so the same images (in the same batch) give the same texts
    and the caller's random state is left as it was.

    The model is a submodule (it follows ``.to()``); the processor holds no tensors and is a plain attribute.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        instruction: str,
        prompt_template: str = LLAVA15_PROMPT_TEMPLATE,
        max_new_tokens: int | None = None,
        source: str | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if "{instruction}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{instruction}}', got {prompt_template!r}")
        if max_new_tokens is not None and max_new_tokens <= 0:
            raise ValueError(
                f"max_new_tokens must be positive (or None for the official budget), got {max_new_tokens}"
            )
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.instruction = instruction
        self.prompt_template = prompt_template
        self.max_new_tokens = max_new_tokens
        self.source = source
        self.temperature = float(temperature)
        self.top_p = None if top_p is None else float(top_p)
        self.seed = int(seed)
        tokenizer = processor.tokenizer
        # Batched generation with a decoder-only model needs the padding on the left, so that every row's last
        # prompt token sits at the end and the new tokens follow it directly.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        instruction: str,
        prompt_template: str = LLAVA15_PROMPT_TEMPLATE,
        max_new_tokens: int | None = None,
        torch_dtype: torch.dtype | str | None = None,
        local_files_only: bool | None = None,
        device: torch.device | str | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int = 0,
        load_in_8bit: bool = False,
    ) -> MLLMCaptioner:
        """Load a LLaVA-class checkpoint (``AutoModelForImageTextToText`` + ``AutoProcessor``) from a hub id or a
        local folder: LLaVA-1.5 (``LlavaForConditionalGeneration``, e.g. ``llava-hf/llava-1.5-7b-hf``) or
        LLaVA-NeXT/1.6 (``LlavaNextForConditionalGeneration``, e.g. ``llava-hf/llava-v1.6-vicuna-13b-hf``),
        whichever the folder's ``config.json`` names.

        ``torch_dtype=None``: float16 on CUDA (the official scripts'), float32 elsewhere. ``device=None``
        leaves the model on the CPU (a LightningModule holding it moves it). ``local_files_only=None`` follows
        ``HF_HUB_OFFLINE``. ``temperature`` / ``top_p`` / ``seed``: see the class. A model that cannot be found
        raises :class:`CaptionerNotFoundError` naming the source, the expected folder layout and the fix.
        ``load_in_8bit``: LLM.int8 weights through bitsandbytes on ``device`` (a CUDA GPU; SUPIR's
        ``--load_8bit_llava``: a 13B LLaVA in about 16 GB); such a model stays on that device (:attr:`quantized`).
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        source = os.fspath(model_id_or_path)
        if local_files_only is None:
            from huggingface_hub import constants

            local_files_only = bool(constants.HF_HUB_OFFLINE)
        dtype = _as_dtype(torch_dtype)
        if dtype is None:
            dtype = (
                torch.float16 if device is not None and torch.device(device).type == "cuda" else torch.float32
            )
        quantization: dict[str, Any] = {}
        if load_in_8bit:
            quantization = _int8_loading(device)
        try:
            processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
            model = AutoModelForImageTextToText.from_pretrained(
                source, dtype=dtype, local_files_only=local_files_only, **quantization
            )
        except (OSError, ValueError) as err:  # hub "not found" errors subclass one of these
            raise CaptionerNotFoundError(_missing_message(source, local_files_only, err)) from err
        captioner = cls(
            model,
            processor,
            instruction,
            prompt_template,
            max_new_tokens,
            source=source,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        if load_in_8bit:
            return captioner
        return captioner.to(device) if device is not None else captioner

    @property
    def quantized(self) -> bool:
        """Whether the weights are bitsandbytes-quantised (they cannot be moved with ``.to()``)."""
        return bool(
            getattr(self.model, "is_loaded_in_8bit", False) or getattr(self.model, "is_quantized", False)
        )

    def with_instruction(
        self,
        instruction: str,
        prompt_template: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> MLLMCaptioner:
        """Another captioner sharing this one's model and processor (no second copy of the weights), e.g. the
        high- and low-level prompts from one checkpoint. Unset (``None``) arguments keep this captioner's."""
        return type(self)(
            self.model,
            self.processor,
            instruction,
            self.prompt_template if prompt_template is None else prompt_template,
            self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            source=self.source,
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p if top_p is None else top_p,
            seed=self.seed if seed is None else seed,
        )

    # ------------------------------------------------------------------------------------------ captioning
    @property
    def prompt(self) -> str:
        """The text sent with every image: the template filled with the instruction."""
        return self.prompt_template.format(instruction=self.instruction)

    @property
    def answer_marker(self) -> str:
        """Where the answer starts: the template's text after ``{instruction}``, stripped (``"ASSISTANT:"`` for
        LLaVA-1.5 and for ``llava_v1``; empty when the instruction ends the template)."""
        return self.prompt_template.rsplit("{instruction}", 1)[-1].strip()

    @property
    def do_sample(self) -> bool:
        """Whether :meth:`caption` samples (``temperature > 0``) rather than decoding greedily."""
        return self.temperature > 0

    def new_token_budget(self) -> int:
        """``max_new_tokens``, or the official ``max_length=200`` less the prompt (``<image>`` as 1 token)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        prompt_length = len(self.processor.tokenizer(self.prompt)["input_ids"])
        if prompt_length >= OFFICIAL_MAX_LENGTH:
            raise ValueError(
                f"the prompt is {prompt_length} tokens, not shorter than the official max_length "
                f"{OFFICIAL_MAX_LENGTH}: set max_new_tokens"
            )
        return OFFICIAL_MAX_LENGTH - prompt_length

    def _answer(self, decoded: str) -> str:
        marker = self.answer_marker
        # The official split(marker)[-1] over prompt + answer: the answer after its last marker, if any.
        text = decoded.split(marker)[-1] if marker else decoded
        return text.replace("\n", " ").strip()

    @torch.no_grad()
    def caption(self, images: Tensor | Sequence[Tensor]) -> list[str]:
        """One text per image: ``images`` ``[B, 3, H, W]`` or a list of ``[3, H, W]`` (any sizes), in [0, 1].

        Batched: one ``generate`` call, prompts left-padded; greedy or seeded sampling (see the class); only the
        generated tokens are decoded.
        """
        pixels = _to_uint8_images(images)
        return self._generate(pixels, [self.prompt] * len(pixels))

    def _generation_kwargs(self) -> dict[str, Any]:
        if not self.do_sample:
            # Greedy, as XPSR's default decoding: the checkpoint's sampling settings are not consulted.
            return {"do_sample": False}
        kwargs: dict[str, Any] = {"do_sample": True, "temperature": self.temperature}
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        return kwargs

    def _generate(self, pixels: list[Tensor], prompts: list[str]) -> list[str]:
        """processor -> generate -> decode for uint8 images and one prompt each (prompts may differ in length:
        the tokenizer pads on the left)."""
        if not pixels:
            return []
        inputs = self.processor(
            images=pixels, text=prompts, return_tensors="pt", padding=True, padding_side="left"
        )
        param = next(self.model.parameters())
        inputs = {
            k: (v.to(param.device, param.dtype) if k == "pixel_values" else v.to(param.device))
            if isinstance(v, Tensor)
            else v
            for k, v in inputs.items()
        }
        kwargs = self._generation_kwargs()
        with _seeded(self.seed, param.device, enabled=self.do_sample):
            out = self.model.generate(**inputs, **kwargs, max_new_tokens=self.new_token_budget())
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        decoded = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [self._answer(text) for text in decoded]

    def forward(self, images: Tensor | Sequence[Tensor]) -> list[str]:
        """Same as :meth:`caption`."""
        return self.caption(images)

    def train(self, mode: bool = True) -> MLLMCaptioner:
        """Always eval mode: the captioner is frozen, so a parent module's ``.train()`` must not switch the
        MLLM's dropout on."""
        return super().train(False)

    def extra_repr(self) -> str:
        decoding = "greedy" if not self.do_sample else f"temperature={self.temperature}, top_p={self.top_p}"
        return (
            f"source={self.source!r}, instruction={self.instruction!r}, max_new_tokens={self.max_new_tokens}, "
            f"{decoding}"
        )


@contextmanager
def _seeded(seed: int, device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Run the block with the CPU generator and ``device``'s generator seeded with ``seed``, restoring both
    afterwards (:func:`torch.random.fork_rng`), so sampled captions repeat and the caller's draws do not move.

    Only the generators of the CPU and of ``device`` are touched: ``torch.manual_seed`` would also (lazily) seed
    every other accelerator, which ``fork_rng`` restores only for the devices it forks.
    """
    if not enabled:
        yield
        return
    accelerator = device.type if device.type != "cpu" else None
    forked = [device] if accelerator is not None else []
    with torch.random.fork_rng(devices=forked, device_type=accelerator or "cuda"):
        torch.default_generator.manual_seed(seed)
        if accelerator == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        elif accelerator is not None:
            torch.get_device_module(accelerator).manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------- tiny LLaVA
# A fixed English sample the tiny tokenizer's merges are learnt from: the prompts' words take few tokens.
_TINY_CORPUS = (
    "USER: ASSISTANT: Please provide a descriptive summary of the content of this image. "
    "Please describe the quality of this image and evaluate it based on factors such as clarity, color, "
    "noise, and lighting. Describe and evaluate the quality of the image. "
    "The image shows a cat, a dog, a person and a red car on a street with trees. The quality is good, "
    "sharp, clear and bright; it is blurry, noisy, dark, low resolution with jpeg artifacts."
)
_TINY_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
# Tiny CLIP: 32 px input, 8 px patches -> 16 patch tokens (+ CLS, dropped by the "default" feature selection).
_TINY_IMAGE_SIZE = 32
_TINY_PATCH = 8


def _tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A real byte-level BPE tokenizer (HF ``tokenizers``) trained offline on :data:`_TINY_CORPUS`, wrapped
    in ``PreTrainedTokenizerFast`` with LLaMA's special tokens (``<s>`` prepended) and LLaVA's ``<image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_TINY_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS], trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )


def _tiny_vision_config() -> Any:
    """The 2-layer CLIP vision tower of the tiny LLaVAs: 32 px input, 8 px patches, hidden 32."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=_TINY_IMAGE_SIZE,
        patch_size=_TINY_PATCH,
        projection_dim=32,
    )


def _tiny_text_config(tokenizer: Any, max_position_embeddings: int = 512) -> Any:
    """The 2-layer LLaMA (hidden 32) of the tiny LLaVAs, over the tiny tokenizer's vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _random_model(model_cls: Any, config: Any, seed: int) -> nn.Module:
    """``model_cls(config)`` with weights drawn from ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config)


def _suppress_non_words(model: nn.Module, tokenizer: Any) -> None:
    """Random weights would emit stray bytes and special tokens (an end-of-sequence first gives an empty text):
    let the model write only letters and words, so tiny captions are readable, never empty, max_new_tokens long."""
    words = re.compile(r" ?[A-Za-z]+")
    model.generation_config.suppress_tokens = [
        i for i in range(len(tokenizer)) if not words.fullmatch(tokenizer.decode([i]))
    ]


def tiny_llava(instruction: str, seed: int = 0, max_new_tokens: int = 8) -> MLLMCaptioner:
    """A random-weight, CPU-sized LLaVA-1.5 (frozen) asked ``instruction``: for tests and smoke runs.

    The classes of the real checkpoint, built from configs in code: ``LlavaForConditionalGeneration`` with a
    2-layer CLIP vision tower (32 px, 8 px patches, hidden 32; feature layer -2, CLS dropped -> 16 image
    tokens) and a 2-layer LLaMA (hidden 32), a real ``LlavaProcessor`` with a ``CLIPImageProcessor`` (resize
    the short side to 32, centre crop 32) and a byte-level BPE tokenizer built offline. Same code path as the
    real model; the text is random. Deterministic for a ``seed`` (the global RNG is left untouched).
    """
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _tiny_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": _TINY_IMAGE_SIZE},
        crop_size={"height": _TINY_IMAGE_SIZE, "width": _TINY_IMAGE_SIZE},
    )
    # As llava-hf's processor config: patch size, the CLS token the tower adds, the "default" selection.
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_TINY_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=_tiny_vision_config(),
        text_config=_tiny_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(_TINY_IMAGE_SIZE // _TINY_PATCH) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _random_model(LlavaForConditionalGeneration, config, seed)
    _suppress_non_words(model, tokenizer)
    return MLLMCaptioner(model, processor, instruction, max_new_tokens=max_new_tokens, source=None)


# LLaVA-1.6's "anyres" grid, scaled down: the 336 px tiles of [[336, 672], [672, 336], [672, 672], [1008, 336],
# [336, 1008]] (llava-hf/llava-v1.6-vicuna-13b-hf) become 32 px tiles, so an image is the base view + 2 or 4 tiles.
_TINY_GRID_PINPOINTS = [[_TINY_IMAGE_SIZE * h, _TINY_IMAGE_SIZE * w] for h, w in ((1, 2), (2, 1), (2, 2))]


def tiny_llava_next(
    instruction: str = DREAMCLEAR_INSTRUCTION,
    seed: int = 0,
    max_new_tokens: int = 8,
    prompt_template: str = LLAVA_V1_PROMPT_TEMPLATE,
    temperature: float = 0.0,
    top_p: float | None = None,
) -> MLLMCaptioner:
    """A random-weight, CPU-sized LLaVA-NeXT/1.6 (frozen) asked ``instruction``: DreamClear's captioner in small.

    The classes of ``llava-hf/llava-v1.6-vicuna-13b-hf``, built from configs in code:
    ``LlavaNextForConditionalGeneration`` with the tiny LLaVA-1.5's 2-layer CLIP tower and 2-layer LLaMA
    (:func:`tiny_llava`), and a real ``LlavaNextProcessor`` + ``LlavaNextImageProcessor`` doing LLaVA-1.6's
    "anyres" split on a tiny grid (32 px base view, pinpoints 32x64, 64x32, 64x64: up to 5 views, 16 patch tokens
    each, unpadded per image, so images of different sizes get different numbers of image tokens), with the
    same offline byte-level BPE tokenizer. The prompt defaults to the ``llava_v1`` conversation
    (:data:`LLAVA_V1_PROMPT_TEMPLATE`); ``temperature`` / ``top_p`` as :class:`MLLMCaptioner`'s (``seed`` also
    seeds the sampling). Same code path as the real model; the text is random. Deterministic for a ``seed``.
    """
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = _tiny_tokenizer()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": _TINY_IMAGE_SIZE},
        crop_size={"height": _TINY_IMAGE_SIZE, "width": _TINY_IMAGE_SIZE},
        image_grid_pinpoints=_TINY_GRID_PINPOINTS,
    )
    # As llava-hf's v1.6 processor config: patch size, the CLS token the tower adds, the "default" selection.
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_TINY_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    # The llava_v1 system text costs ~100 tokens with this tiny vocabulary, + up to 80 image tokens.
    config = LlavaNextConfig(
        vision_config=_tiny_vision_config(),
        text_config=_tiny_text_config(tokenizer, max_position_embeddings=1024),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=_TINY_GRID_PINPOINTS,
        image_seq_length=(_TINY_IMAGE_SIZE // _TINY_PATCH) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _random_model(LlavaNextForConditionalGeneration, config, seed)
    _suppress_non_words(model, tokenizer)
    return MLLMCaptioner(
        model,
        processor,
        instruction,
        prompt_template,
        max_new_tokens=max_new_tokens,
        source=None,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )

"""A Hugging Face sequence-classification model used as a reward model: a local directory, or
a hub id where a model hub is reachable.

This is how the paper's helpful / harmless / humor rewards are used: the prompt and response
are joined into one input, the classifier runs, and one of its logits is the reward. The
model's config is read at construction (so a bad label fails early); the weights load on the
first score, directly onto the device (``MAVIS_DEVICE`` by default) in the dtype
(``MAVIS_DTYPE``). Weights are read from safetensors only and no code from the model runs
unless ``trust_remote_code`` is turned on.
"""

from __future__ import annotations

import re
import string
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mavis_lc.errors import ConfigurationError, ModelLoadError
from mavis_lc.objectives.base import MODEL_DENSE_STATES, Objective

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

DEFAULT_TEMPLATE = "{prompt}\n\n{response}"
"""How prompt and response are joined when the tokenizer has no chat template."""

_MODES = ("auto", "chat", "pair")


class HFRewardModelObjective(Objective):
    """Reward = one logit of a local ``AutoModelForSequenceClassification`` on (prompt, response).

    Args:
        model_dir: a local model directory holding ``config.json``, safetensors weights and a
            tokenizer, or a hub id (``org/name``; needs a reachable model hub, else a clear error).
        name: objective name; default the directory's name.
        label: the label whose logit is the reward (a key of the config's ``label2id``).
        logit_index: the logit index that is the reward. Give ``label`` or ``logit_index``, not
            both; a single-logit model needs neither.
        template: how prompt and response become the model input:
            ``"auto"`` (default): the tokenizer's chat template (user turn = prompt, assistant
            turn = response) when it has one, else `DEFAULT_TEMPLATE`;
            ``"chat"``: the chat template, required;
            ``"pair"``: the tokenizer's text-pair encoding ``tokenizer(prompt, response)``
            (cross-encoder reward models such as OpenAssistant's DeBERTa);
            any other string: a format string with ``{response}`` and optionally ``{prompt}``.
        max_length: inputs longer than this many tokens are truncated.
        truncation_side: ``"left"`` (default) drops the start of long inputs, so the end of
            the response, which the classifier head reads, survives.
        batch_size: pairs per forward pass.
        device: torch device for the model (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``);
            default ``MAVIS_DEVICE``.
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``,
            ``"float16"``; default ``MAVIS_DTYPE``. Rewards are returned as float32 whatever it is.
        revision: a hub revision (branch, tag or commit) for a hub id; pin one for reproducible rewards.
        trust_remote_code: allow the model's own code to run. Off by default.
        description: defaults to one naming the directory and the chosen logit.

    Raises:
        ConfigurationError: the directory or its config is missing, the template is malformed,
            both or neither of ``label`` / ``logit_index`` are given for a multi-logit model,
            or the label or index does not exist (the message lists the labels).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        name: str | None = None,
        label: str | None = None,
        logit_index: int | None = None,
        template: str = "auto",
        max_length: int = 512,
        truncation_side: Literal["left", "right"] = "left",
        batch_size: int = 8,
        device: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        description: str | None = None,
    ) -> None:
        local = Path(model_dir).expanduser()
        self.hub_id: str | None = None
        if (local / "config.json").is_file():
            self.model_dir = local
        elif _HUB_ID.match(str(model_dir)) and not local.exists():
            self.hub_id = str(model_dir)
            self.model_dir = Path(str(model_dir))
        else:
            raise ConfigurationError(
                f"{str(model_dir)!r} is not a model directory (no config.json) and not a hub id (org/name)"
            )
        from mavis_lc.base_model import resolve_device, resolve_dtype

        self.torch_device = resolve_device(device)
        self.torch_dtype = resolve_dtype(dtype, self.torch_device)
        self.revision = revision
        _check_template(template)
        for option, value in (("max_length", max_length), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{option} must be a positive integer, got {value!r}")
        if truncation_side not in ("left", "right"):
            raise ConfigurationError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        self.template = template
        self.max_length = max_length
        self.truncation_side = truncation_side
        self.batch_size = batch_size
        self.device = str(self.torch_device)
        self.trust_remote_code = trust_remote_code
        self.logit_index, logit_label = self._resolve_logit(label, logit_index)
        self._model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._lock = threading.Lock()
        super().__init__(
            name if name is not None else self._default_name(),
            self._reward,
            description=description
            if description is not None
            else f"Logit {logit_label!r} of the reward model {self.hub_id or self.model_dir}.",
            reward_range=None,
            prefix_scoring=True,  # a reward model reads any text; a partial answer is one
            dense_states=MODEL_DENSE_STATES,  # a forward of the reward model per call
        )

    def _resolve_logit(self, label: str | None, logit_index: int | None) -> tuple[int, str]:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(
                self._source(), trust_remote_code=self.trust_remote_code, **self._where()
            )
        except Exception as exc:
            if self.hub_id is not None:
                raise ConfigurationError(
                    f"cannot fetch the reward model {self.hub_id!r} from the model hub ({type(exc).__name__}: "
                    f"{exc}); where no hub is reachable, download it elsewhere and pass its local directory"
                ) from exc
            raise ConfigurationError(f"cannot read the model config in {str(self.model_dir)!r}: {exc}") from exc
        id2label = {int(i): str(text) for i, text in config.id2label.items()}
        num_labels = len(id2label)
        labels = ", ".join(f"{i}={text!r}" for i, text in sorted(id2label.items()))
        if label is not None and logit_index is not None:
            raise ConfigurationError(f"give label or logit_index, not both (got {label!r} and {logit_index!r})")
        if label is not None:
            matches = [i for i, text in id2label.items() if text == label]
            if not matches:
                raise ConfigurationError(f"reward model has no label {label!r}; labels: {labels}")
            return matches[0], label
        if logit_index is None:
            if num_labels != 1:
                raise ConfigurationError(
                    f"reward model has {num_labels} logits ({labels}); pass label= or logit_index="
                )
            logit_index = 0
        if isinstance(logit_index, bool) or not isinstance(logit_index, int) or not 0 <= logit_index < num_labels:
            raise ConfigurationError(f"logit_index must be in [0, {num_labels}), got {logit_index!r}; labels: {labels}")
        return logit_index, id2label[logit_index]

    def load(self) -> HFRewardModelObjective:
        """Load tokenizer and weights now rather than on the first score; returns self.

        Raises:
            ModelLoadError: the tokenizer or the safetensors weights cannot be loaded, or
                ``template="chat"`` and the tokenizer has no chat template.
        """
        with self._lock:
            if self._model is None:
                self._tokenizer, self._model = self._load()
        return self

    def _load(self) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                self._source(), trust_remote_code=self.trust_remote_code, **self._where()
            )
            model = AutoModelForSequenceClassification.from_pretrained(
                self._source(),
                trust_remote_code=self.trust_remote_code,
                use_safetensors=True,
                dtype=self.torch_dtype,
                device_map=str(self.torch_device),  # the weights load straight onto the device
                **self._where(),
            )
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load the reward model in {str(self.model_dir)!r} (safetensors weights and a "
                f"tokenizer are required): {exc}"
            ) from exc
        if self.template == "chat" and not tokenizer.chat_template:
            raise ModelLoadError(f"template='chat' but the tokenizer in {str(self.model_dir)!r} has no chat template")
        # Batches need padding, and classifiers that read the last token find it through the
        # config's pad_token_id: pad with the id the model was configured (trained) with, else
        # the tokenizer's pad token, else its eos token.
        text_config = model.config.get_text_config()
        pad_id = text_config.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ModelLoadError(
                f"the reward model in {str(self.model_dir)!r} defines no pad token and its tokenizer "
                "has no pad or eos token to pad with"
            )
        if tokenizer.pad_token_id != pad_id:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad_id))
        text_config.pad_token_id = pad_id
        tokenizer.truncation_side = self.truncation_side
        model.eval()
        model.requires_grad_(False)
        return tokenizer, model

    def _default_name(self) -> str:
        return self.hub_id.split("/")[-1] if self.hub_id else self.model_dir.resolve().name

    def _source(self) -> str:
        return self.hub_id if self.hub_id is not None else str(self.model_dir)

    def _where(self) -> dict[str, Any]:
        """from_pretrained options: local files only for a directory, the revision for a hub id."""
        if self.hub_id is None:
            return {"local_files_only": True}
        return {"revision": self.revision} if self.revision else {}

    def _encode(self, prompts: Sequence[str], responses: Sequence[str]) -> Any:
        tokenizer = self._tokenizer
        assert tokenizer is not None
        common: dict[str, Any] = {
            "padding": True,
            "truncation": True,
            "max_length": self.max_length,
            "return_tensors": "pt",
        }
        if self.template == "pair":
            return tokenizer(list(prompts), list(responses), **common)
        if self.template == "chat" or (self.template == "auto" and tokenizer.chat_template):
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
                )
                for p, r in zip(prompts, responses, strict=True)
            ]
            # The rendered template already carries its special tokens.
            return tokenizer(texts, add_special_tokens=False, **common)
        template = DEFAULT_TEMPLATE if self.template == "auto" else self.template
        texts = [template.format(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]
        return tokenizer(texts, **common)

    def _reward(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        import torch

        self.load()
        model = self._model
        assert model is not None
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(responses), self.batch_size):
                stop = start + self.batch_size
                batch = self._encode(prompts[start:stop], responses[start:stop]).to(model.device)
                logits = model(**batch).logits  # (b, num_labels)
                scores.extend(logits[:, self.logit_index].float().tolist())
        return scores


def _check_template(template: str) -> None:
    if template in _MODES:
        return
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as exc:
        raise ConfigurationError(f"template {template!r} is not a valid format string: {exc}") from exc
    if "response" not in fields or not fields <= {"prompt", "response"}:
        raise ConfigurationError(
            f"template must be one of {list(_MODES)} or a format string using {{response}} and "
            f"optionally {{prompt}}, got {template!r}"
        )

"""LangChain models: `MavisLLM` (text completion) and `ChatMavis` (chat, via the chat template).

Construction is cheap and loads nothing; the base model and value heads are loaded on first
use into a process-level cache (`mavis_lc.decoding.engine`), so copies made by ``bind``,
``configurable_fields`` or ``with_config`` share them.

Weights come, in order of precedence, from the call (``invoke(p, weights={...})``, or in
``batch`` a list of mappings aligned with the inputs), the ``weights`` field, the ``preset``
field (a preset in the registry), and otherwise each loaded head weighs 1/M. They multiply Q
as given (see `mavis_lc.weights`).

Modules: `params` (fields and call plumbing both classes share), `llms` (`MavisLLM`),
`chat_models` (`ChatMavis`), `tools` (tool schemas, the chat template's tool block, grammars
and parsing of tool calls).
"""

from mavis_lc.langchain.chat_models import ChatMavis
from mavis_lc.langchain.llms import MavisLLM
from mavis_lc.langchain.params import CALL_PARAMS, CONFIG_KEY, ROW_PARAMS

__all__ = ["CALL_PARAMS", "CONFIG_KEY", "ROW_PARAMS", "ChatMavis", "MavisLLM"]

"""A tiny ChatGLM-6B vocabulary for tests: an ice_text.model trained here, laid out like the real one
(chatglm_v1_spec.md 6), and the hub's tokenizer_config.json beside it. Nothing downloaded.

Layout of the model's pieces (the real ids in brackets): <unk> 0, <s> 1, </s> 2, <pad> 3, <n> 4, then the trained
pieces ("▁" first, as the real 5), then [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK> (130000..),
<|tab|>, <|blank_2|>..<|blank_80|> (130008..130087) and the 256 byte pieces <0x00>..<0xFF> (130088..130343).
"""

from __future__ import annotations

from glm_export.tokenizer_training import CHATGLM_COMMANDS as COMMANDS
from glm_export.tokenizer_training import CHATGLM_CORPUS as CORPUS
from glm_export.tokenizer_training import CHATGLM_USER_DEFINED as USER_DEFINED
from glm_export.tokenizer_training import CHATGLM_WHITESPACE as WHITESPACE
from glm_export.tokenizer_training import train_ice_text_model as make_ice_text_model
from glm_export.tokenizer_training import write_chatglm_tokenizer_config as write_tokenizer_config

__all__ = ["COMMANDS", "CORPUS", "USER_DEFINED", "WHITESPACE", "make_ice_text_model", "write_tokenizer_config"]

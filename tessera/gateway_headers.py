"""Request headers the gateway's Lua filter (``control_plane/xds/usage.lua``) sets for ext_authz:
facts read off the request body and the route, which ext_authz's one callout decides on.

Never a client's: Envoy removes client-sent ones before any filter runs (the listener's early
header mutation), and ext_authz removes them before the request goes upstream. Envoy sends
ext_authz only these and the credentials (``allowed_headers``), over gRPC or HTTP alike.
"""

from __future__ import annotations

from typing import Final

MODEL: Final = "x-tessera-model"  # the served model (an alias resolved), from the route
BODY_BYTES: Final = "x-tessera-body-bytes"  # the body's size as received (chunked or not)
MAX_TOKENS: Final = "x-tessera-max-tokens"  # the body's max_tokens as written (or the default put in)
MAX_COMPLETION_TOKENS: Final = "x-tessera-max-completion-tokens"  # ... and max_completion_tokens
MAX_OUTPUT_TOKENS: Final = "x-tessera-max-output-tokens"  # ... max_output_tokens (/v1/responses)
N_PREDICT: Final = "x-tessera-n-predict"  # ... n_predict (llama.cpp's own name, which wins there)
N: Final = "x-tessera-n"  # the body's n (choices generated)
BEST_OF: Final = "x-tessera-best-of"  # the body's best_of (sequences generated, completions)
PROMPTS: Final = "x-tessera-prompts"  # how many prompts a completions body batches (an array)
JWT_PAYLOAD: Final = "x-tessera-jwt-payload"  # set by jwt_authn once it has verified a JWT
# the Envoy's node (its ENVOY_NODE_ID, as its usage lines name it): the usage backstop's ledger key
NODE: Final = "x-tessera-node"

SET_BY_GATEWAY: Final = (
    MODEL,
    BODY_BYTES,
    MAX_TOKENS,
    MAX_COMPLETION_TOKENS,
    MAX_OUTPUT_TOKENS,
    N_PREDICT,
    N,
    BEST_OF,
    PROMPTS,
    JWT_PAYLOAD,
    NODE,
)
CREDENTIALS: Final = ("authorization", "x-api-key")

"""The remote critics, over HTTP: our own critic server (`espo-server critic`, `POST /v1/values`) and
a stock vLLM pooling server (`POST /pooling`). One pooled httpx client each; errors are CriticError.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import httpx

from .critic import CriticAnswer, CriticError, ValuesFromScore
from .errors import Forbidden, InvalidRequest

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 600.0
"""How long a forwarded critic push may take (it waits for the critic's queries in flight)."""
KEEPALIVE_EXPIRY_S = 2.0
"""How long an idle pooled connection to a critic server is kept: below the 5 s after which a uvicorn
server with its default keep-alive (vLLM's) closes one (ours keeps them 75 s: serve.KEEP_ALIVE_S)."""


class _HttpCritic(ValuesFromScore):
    """Shared HTTP plumbing of the remote critics: one pooled httpx client (connections are kept
    alive and reused by every batch), errors as CriticError."""

    name: str
    version: int | None = None

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 5.0,
        client: httpx.AsyncClient | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout_s,
            limits=httpx.Limits(
                max_connections=32, max_keepalive_connections=32, keepalive_expiry=KEEPALIVE_EXPIRY_S
            ),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )

    async def _post(self, path: str, body: dict, timeout: float | None = None) -> dict:
        kwargs = {} if timeout is None else {"timeout": timeout}
        try:
            response = await self._client.post(path, json=body, **kwargs)
        except httpx.HTTPError as exc:
            raise CriticError(f"critic at {self.base_url} unreachable: {exc!r}") from exc
        if response.status_code in (400, 403):
            error = _error_of(response)
            kind = InvalidRequest if response.status_code == 400 else Forbidden
            raise kind(f"critic at {self.base_url}: {error.get('message')}", error.get("param"))
        if response.status_code == 401:
            raise CriticError(f"critic at {self.base_url} refused our bearer token: set --critic-api-key")
        if response.status_code != 200:
            raise CriticError(
                f"critic at {self.base_url}{path} answered {response.status_code}: {response.text[:200]}"
            )
        return response.json()

    async def check(self) -> None:
        try:
            response = await self._client.get("/health")
        except httpx.HTTPError as exc:
            raise CriticError(f"critic at {self.base_url} unreachable: {exc!r}") from exc
        if response.status_code != 200:
            raise CriticError(f"critic at {self.base_url} not healthy: {response.status_code}")

    async def aclose(self) -> None:
        await self._client.aclose()


def _error_of(response: httpx.Response) -> dict:
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    return error if isinstance(error, dict) else {"message": response.text[:200]}


class EspoValuesCritic(_HttpCritic):
    """Our critic protocol: `POST /v1/values {"token_ids": [[...]]}` -> `{"values", "critic_version",
    "computed_tokens"}`; pushes go to its `POST /v1/critic/weights`."""

    name = "remote"

    async def score(self, prefixes: Sequence[Sequence[int]]) -> CriticAnswer:
        body = await self._post("/v1/values", {"token_ids": [list(p) for p in prefixes]})
        try:
            values = [float(v) for v in body["values"]]
            computed = body.get("computed_tokens") or [len(p) for p in prefixes]
            version = body.get("critic_version")
            answer = CriticAnswer(
                values, [int(n) for n in computed], None if version is None else int(version)
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CriticError(f"malformed /v1/values answer: {str(body)[:200]}") from exc
        if answer.version is not None:
            self.version = answer.version
        return answer

    async def refresh_version(self) -> None:
        """Ask the critic server which version it serves (best effort: start-up, /v1/info)."""
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            response = await self._client.get("/v1/info")
            if response.status_code == 200:
                self.version = int(response.json()["critic_version"])

    async def load_weights(self, path: str, version: int | None) -> tuple[int, float]:
        body = {"path": path} if version is None else {"path": path, "version": version}
        answer = await self._post("/v1/critic/weights", body, timeout=PUSH_TIMEOUT_S)
        try:
            self.version = int(answer["critic_version"])
            return self.version, float(answer["load_time_s"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CriticError(f"malformed /v1/critic/weights answer: {str(answer)[:200]}") from exc


class VllmPoolingCritic(_HttpCritic):
    """vLLM's `POST /pooling` with `task=classify` (LAST pooling: the server reuses cached prefixes).
    vLLM serves a `*ForTokenClassification` model with `token_classify` only, unless it was started
    with `--pooler-config '{"task": "classify"}'`; against such a server this client falls back to
    `token_classify` (per-token outputs, the last one taken: whole prefixes re-encoded) and says so
    in the log. A stock vLLM server reports neither a weights version nor its cache hits, so its
    queries count whole prefixes; it cannot be pushed weights from here."""

    name = "vllm-pooling"

    def __init__(self, base_url: str, *, model: str | None = None, task: str = "classify", **kwargs) -> None:
        super().__init__(base_url, **kwargs)
        self.model = model
        self.task = task

    async def score(self, prefixes: Sequence[Sequence[int]]) -> CriticAnswer:
        body: dict = {"input": [list(p) for p in prefixes], "task": self.task, "use_activation": False}
        if self.model:
            body["model"] = self.model
        try:
            answer = await self._post("/pooling", body)
        except InvalidRequest as exc:
            if self.task != "classify" or "task" not in f"{exc.param} {exc.message}":
                raise CriticError(str(exc)) from exc
            log.warning(
                "the vLLM critic at %s does not serve `classify` (%s): falling back to token_classify, "
                'which re-encodes every prefix; start it with --pooler-config \'{"task": "classify"}\'',
                self.base_url,
                exc.message,
            )
            self.task = "token_classify"
            return await self.score(prefixes)
        try:
            rows = sorted(answer["data"], key=lambda d: d["index"])
            values = [_last_value(row["data"]) for row in rows]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CriticError(f"malformed /pooling answer: {str(answer)[:200]}") from exc
        return CriticAnswer(values, [len(p) for p in prefixes], None)

    async def load_weights(self, path: str, version: int | None) -> tuple[int, float]:
        raise InvalidRequest(
            f"this server's critic is a stock `vllm serve` at {self.base_url}, which takes no weight "
            "pushes from here: run `espo-server critic` as the critic (--critic remote) to push to it",
            None,
        )


def _last_value(data) -> float:
    """Per-token output [[v], [v], ...] or [v, v, ...], or LAST pooling's [v] -> the last value."""
    last = data[-1]
    return float(last[0] if isinstance(last, list) else last)

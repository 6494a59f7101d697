"""Retries of a model call that failed transiently (a 429 or 502-504, a connection the
server broke): exponential backoff with jitter (tenacity, on trio), from `retry_wait_s`
up to WAIT_MAX_S, `retries` times (models.toml, per model), each a `model_retry`
event. Only before the first token: once text has streamed to the reader, a retry
would repeat it, so the failure stands. What is left failing counts toward the
model's circuit breaker once (breaker.py), not once per try."""
import tenacity
import trio

from ...drivers.providers import ProviderFailure

WAIT_MAX_S = 10.0


async def chat(model, conv, turn, max_tokens, options, logged) -> dict:
    """model's provider's reply to conv, streamed into turn (options: the request's
    temperature and tool_choice, when it gave them); logged(**fields) before each retry."""
    streamed = False

    def emit(text: str) -> None:
        nonlocal streamed
        streamed = True
        turn.text.append(text.encode())

    def worth_retry(e: BaseException) -> bool:
        return isinstance(e, ProviderFailure) and e.transient and not streamed

    def before_sleep(state: tenacity.RetryCallState) -> None:
        logged(attempt=state.attempt_number, wait_s=round(state.next_action.sleep, 3),
               reason=state.outcome.exception().text)

    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(model.retries + 1), sleep=trio.sleep,
        wait=tenacity.wait_exponential_jitter(initial=model.retry_wait_s, max=WAIT_MAX_S,
                                              jitter=model.retry_wait_s),
        retry=tenacity.retry_if_exception(worth_retry), before_sleep=before_sleep,
        reraise=True)
    async for attempt in retrying:
        with attempt:
            result = await model.provider.chat(conv.messages, conv.tools, max_tokens,
                                               options.get("temperature", model.temperature),
                                               emit,
                                               tool_choice=options.get("tool_choice"))
    return result

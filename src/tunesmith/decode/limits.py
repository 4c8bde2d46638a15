"""The numerically safe ranges of the sampling values (no torch import: the CLI's argument bounds use them too).

Outside them, float32 arithmetic turns a row's probabilities into inf/nan: a temperature under ~1e-37 divides
logits into inf, a top_p that rounds to 0 drops every token, a repetition penalty of 1e-300 divides into inf.
"""

MIN_TEMPERATURE = 1e-4  # 0 is greedy; (0, MIN_TEMPERATURE) is refused, and greedy for the sampler itself
MAX_TEMPERATURE = 100
MIN_TOP_P = 1e-4
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100
MAX_PRESENCE_PENALTY = 2.0  # OpenAI's bounds for presence_penalty / frequency_penalty: [-2, 2]
MAX_LOGIT_BIAS = 100.0  # and for logit_bias values: [-100, 100]
MAX_TOP_LOGPROBS = 20

"""Structured output: grammars (JSON schema, regex, choice, EBNF) compiled by xgrammar, cached,
and matched token by token to mask the sampler's logits; tool-call parsing for the server."""

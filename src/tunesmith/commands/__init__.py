"""The verbs of `tunesmith <verb>`, one module each: they load, run and report, over the library below them."""

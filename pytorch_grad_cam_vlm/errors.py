"""The one exception type for bad input that the command line reports as one line with exit code 2."""


class InputError(ValueError):
    """Bad input (a file, an option, a model name): the message says what is wrong and what to do."""

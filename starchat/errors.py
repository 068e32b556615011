"""The one shape of a bad-input error: which field, and what is wrong with it."""


class FieldError(ValueError):
    """Bad input; `field` names it (e.g. "top_p", "messages[1].role"), `message` says what is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

"""The data pipeline's error for a setting that cannot work; its message says what to change."""


class DataError(ValueError):
  """config.data matches no files, a tokenizer was trained on other data, or there is less than one batch."""

VALUES: dict[str, int]

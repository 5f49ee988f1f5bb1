VALUES: dict[str, int]
MTU_BYTES: dict[int, int]

from .. import register


class TritonBackend:
    name = "triton"

    def availability(self):
        return False, "not yet"

    def not_supported_reasons(self, x, rank):
        return []


register(TritonBackend())

"""The text tables a run prints row by row (so long runs show progress)."""

from __future__ import annotations

from benchmarks._results import PEAK


class Table:
    """A fixed-width text table: columns (key, width, format); format "" means str."""

    def __init__(self, columns: list[tuple[str, int, str]]):
        self.columns = columns

    def header(self) -> str:
        head = "".join(f"{key:>{width}}" if i else f"{key:<{width}}"
                       for i, (key, width, _) in enumerate(self.columns))
        return head + "\n" + "-" * len(head)

    def row(self, values: dict) -> str:
        cells = []
        for i, (key, width, fmt) in enumerate(self.columns):
            value = values.get(key)
            if value is None or (isinstance(value, float) and value != value):
                text = ""
            elif fmt:
                text = format(value, fmt)
            else:
                text = str(value)
            cells.append(f"{text:<{width}}" if i == 0 else f"{text:>{width}}")
        return "".join(cells)


class OpTable(Table):
    """The table of an op suite: a row per implementation and case (benchmarks/_results.OpRows)."""

    def __init__(self, baseline: str):
        self.baseline = baseline
        super().__init__([
            ("impl", 16, ""), ("N", 7, "d"), ("D", 6, "d"), ("dtype", 10, ""),
            ("fwd ms", 10, ".1f"), ("bwd ms", 10, ".1f"), ("total ms", 10, ".1f"),
            ("[q20, q80]", 20, ""), ("TFLOP/s", 9, ".3f"), ("% peak", 7, ".0f"),
            ("x floor", 8, ".2f"), (f"vs {baseline}", max(9, len(baseline) + 5), ".2f"), ("peak MiB", 10, ".0f"),
            ("extra MiB", 10, ".0f"), ("  note", 0, "")])

    @staticmethod
    def _case(row: dict) -> dict:
        return {"impl": row["impl"], "N": row["n"], "D": row["d"], "dtype": row["dtype"]}

    def failed(self, result: dict, note: str) -> str:
        return self.row({**self._case(result), "  note": "  " + note})

    def reference(self, row: dict) -> str:
        """A matmul floor or peak row."""
        return self.row({**self._case(row), "total ms": row["total_median_ms"], "TFLOP/s": row["tflops"],
                         "x floor": None if row["impl"] == PEAK else 1.0})

    def measured(self, row: dict) -> str:
        """An implementation's row (benchmarks/_results.OpRows.measured)."""
        if "total_median_ms" not in row:
            return self.failed(row, f"{row['status']}: {row.get('error') or ''}")
        return self.row({**self._case(row), "fwd ms": row["fwd_median_ms"], "bwd ms": row["bwd_median_ms"],
                         "total ms": row["total_median_ms"],
                         "[q20, q80]": f"[{row['total_q20_ms']:.1f}, {row['total_q80_ms']:.1f}]",
                         "TFLOP/s": row["tflops"], "% peak": row["pct_of_mm_peak"],
                         "x floor": row["x_floor"], f"vs {self.baseline}": row[f"speedup_vs_{self.baseline}"],
                         "peak MiB": row["peak_mib"], "extra MiB": row["extra_mib"],
                         "  note": "  " + row["note"] if row["note"] else ""})

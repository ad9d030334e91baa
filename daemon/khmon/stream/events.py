"""The names of the events khmon traces, in one place.

Tracepoints keep the kernel's own names (tracefs events/huge_memory/<name>); which of them a
kernel has is read from tracefs (khmon.kernel.tracefs), never assumed. Function-probe events
are khmon's own, made from the per-PMD function and collapse_huge_page (khmon.capture.plan).
"""

from __future__ import annotations

# huge_memory tracepoints
SCAN_PMD = "mm_khugepaged_scan_pmd"  # one per PMD scanned: verdict, the scanned page
SCAN_FILE = "mm_khugepaged_scan_file"
SCAN = "mm_khugepaged_scan"  # one per mm scanned (the mTHP collapse series, 7.2)
COLLAPSE = "mm_collapse_huge_page"  # one per anon collapse attempt: status (and order, 7.2)
ISOLATE = "mm_collapse_huge_page_isolate"  # the isolate step of an attempt: no mm, no address
SWAPIN = "mm_collapse_huge_page_swapin"  # an attempt that swapped pages in
COLLAPSE_FILE = "mm_khugepaged_collapse_file"

# khmon's function-probe events (system "khmon")
FUNC_SYSTEM = "khmon"
FN_PMD_SCAN = "fn_pmd_scan"  # the per-PMD function, entry+exit: mm, address, VMA, verdict
FN_COLLAPSE = "fn_collapse"  # collapse_huge_page, entry+exit: address, order, result, time

# The status every khugepaged event names success with (enum scan_result's SCAN_SUCCEED).
SUCCEEDED = "succeeded"

"""x86-64 memory geometry that khmon's per-PMD views are built on: 4 KiB pages, 512 PTEs to
a PMD, 2 MiB PMDs, and a PMD's present-PTE bitmap of 64 bytes (the kernel's
unsigned long[8], bit k of byte j is PTE 8j+k). One place, so the workload, the bitmap
sources and the correlator cannot disagree."""

PAGE_SHIFT = 12
PAGE = 1 << PAGE_SHIFT
PMD_ORDER = 9  # HPAGE_PMD_ORDER: the order of a whole-PMD collapse
PTES = 1 << PMD_ORDER
PMD_SIZE = PAGE * PTES
BITMAP_BYTES = PTES // 8
PMD_MASK = ~(PMD_SIZE - 1)  # an address & PMD_MASK is its PMD's start

/*
 * khmon: trace khugepaged's collapse path.
 *
 * Traces every huge_memory tracepoint of khugepaged that the running kernel has:
 *   mm_khugepaged_scan_pmd, mm_khugepaged_scan_file, mm_khugepaged_scan (7.2+),
 *   mm_collapse_huge_page, mm_collapse_huge_page_isolate, mm_collapse_huge_page_swapin,
 *   mm_khugepaged_collapse_file.
 * Needs: tracepoints, the BPF ring buffer (5.8+), BTF (struct offsets, read by khmon).
 *
 * Each event's record is `struct khmon_hdr` followed by the event's fields copied verbatim
 * from the trace entry (the layout of its tracefs format file), then its strings.
 *
 * Scan events (once per PMD scanned; several million a second at full speed) are
 * deduplicated here, in a per-CPU table of 4-way sets of 16-byte slots (a set is one cache
 * line) indexed by a 64-bit hash of (thread, payload). The first occurrence of a payload in
 * a slot is sent in full (an
 * install record); its repeats only bump the slot's count, and reach user space as bare
 * headers counting them (flush records): when another payload takes the slot, at the first
 * repeat after user space advances `epoch` (once a second), and, after detaching, from the
 * slots themselves. A repeat touches one cache line and no lock, which is what keeps khmon's
 * cost per scan below bpftrace's count(). The slot keeps only the hash, so two payloads
 * with the same 64-bit hash would share a count (odds 2^-63 per new payload).
 * Every probe hit is counted in `seen` when it is sent or flushed, every event the ring
 * buffer refused in `lost`: nothing is dropped uncounted.
 *
 * What must be exact is counted here too, so it does not depend on records reaching user
 * space: every non-deduplicated event with a status (collapse attempts above all) bumps
 * `exact` by (event, order, status, userfaultfd-armed or not), with summed and maximal
 * duration and a log2 histogram of durations where the event is timed. A record the ring
 * buffer refuses also bumps `lost_at` by (mm, PMD address), so user space can say which PMD
 * records lack detail.
 *
 * Placeholders filled at load time by khmon/bpfgen.py:
 *   NR_EVENTS, RINGBUF_PAGES, DEDUP_SLOTS (per CPU, a power of two), NR_CPU_IDS (the
 *   tables of all CPUs share one array, CPU after CPU), DEDUP_INSTALL, DEDUP_FLUSH,
 *   FILTER_TGID (0: all), HAVE_OWNER, UFFD_MASK (VM_UFFD_* bits of vm_flags; 0: unknown),
 *   MM_OWNER_OFF, TASK_TGID_OFF, TASK_COMM_OFF (byte offsets from the running kernel's BTF),
 *   EVENT_CODE (per-event structs, maps and programs, generated from the format files).
 */

#include <uapi/linux/ptrace.h>  /* struct pt_regs, for kprobes (function-probe tier) */

struct khmon_hdr {
    u64 ts;
    u32 count;
    u16 event;
    u16 cpu;
    u32 tid;
    u32 tgid;
    u32 owner_tgid;
    u32 flags;
    char comm[16];
    char owner_comm[16];
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(sent, u64, 1);  /* records this CPU gave the ring buffer, for khmon_rb_flags */
BPF_PERCPU_ARRAY(seen, u64, NR_EVENTS);
BPF_PERCPU_ARRAY(lost, u64, NR_EVENTS);
BPF_ARRAY(epoch, u64, 1);  /* advanced by user space; 31 bits are compared */

/* Exact counts. Key: KHMON_X_COUNT | event << 22 | order << 17 | status << 9 | uffd << 7, or
 * KHMON_X_HIST | event << 22 | order << 17 | succeeded << 16 | log2(ns). Status is clamped to
 * 0..255 (255: out of range); uffd is 0 (no), 1 (yes) or 2 (unknown). */
struct khmon_xval {
    u64 n;
    u64 ns;
    u64 max;
};
BPF_PERCPU_HASH(exact, u32, struct khmon_xval, 16384);
BPF_PERCPU_ARRAY(exact_full, u64, 1);  /* updates refused because `exact` was full */
#define KHMON_X_COUNT 0U
#define KHMON_X_HIST (1U << 30)
#define KHMON_UFFD_NO 0
#define KHMON_UFFD_YES 1
#define KHMON_UFFD_UNKNOWN 2

struct khmon_lost_key {
    u64 mm;
    u64 addr;  /* the PMD, or 0 for events that name none */
};
BPF_TABLE("lru_hash", struct khmon_lost_key, u64, lost_at, 4096);

/* One dedup slot: `fp` is the payload's hash (0: empty); `ec` packs the epoch of the last
 * flush (bits 33..63), whether -p excludes the payload (bit 32) and its repeats not yet
 * reported (bits 0..31). */
struct khmon_slot {
    u64 fp;
    u64 ec;
};
#define KHMON_WAYS 4
#define KHMON_SETS (DEDUP_SLOTS / KHMON_WAYS)  /* per CPU */
struct khmon_set {
    struct khmon_slot w[KHMON_WAYS];
} __attribute__((aligned(64)));
#define KHMON_EPOCH_SHIFT 33
#define KHMON_EXCLUDED (1ULL << 32)
#define KHMON_COUNT_MAX 0x7fffffffULL

static __always_inline u64 khmon_mix(u64 h, u64 v)
{
    h ^= v;
    h *= 0xff51afd7ed558ccdULL;
    return h ^ (h >> 32);
}

/* murmur3's finaliser: every bit of the hash moves the slot index */
static __always_inline u64 khmon_fmix(u64 h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 33);
}

static __always_inline u64 khmon_epoch(void)
{
    u32 zero = 0;
    u64 *e = epoch.lookup(&zero);
    return e ? (*e & 0x7fffffffULL) : 0;
}

static __always_inline void khmon_add(u32 ev, u64 n, int to_lost)
{
    u64 *c;

    if (to_lost)
        c = lost.lookup(&ev);
    else
        c = seen.lookup(&ev);
    if (c)
        *c += n;
}

static __always_inline void khmon_xadd(u32 key, u64 ns)
{
    struct khmon_xval zero = {};
    struct khmon_xval *v = exact.lookup_or_try_init(&key, &zero);

    if (!v) {
        u32 z = 0;
        u64 *full = exact_full.lookup(&z);
        if (full)
            *full += 1;
        return;
    }
    v->n += 1;
    v->ns += ns;
    if (ns > v->max)
        v->max = ns;
}

/* One event of `ev` with this order and status, `ns` long (0 when not timed); `ok` is the
 * status value that means success, for the histogram. Per-CPU values: no atomics needed. */
static __always_inline void khmon_exact(u32 ev, u32 order, int status, u32 uffd, u64 ns,
                                        int timed, int ok)
{
    u32 st = (status < 0 || status > 254) ? 255 : (u32)status;
    u32 base = (ev & 0xff) << 22 | (order & 31) << 17;

    khmon_xadd(KHMON_X_COUNT | base | st << 9 | (uffd & 3) << 7, ns);
    if (timed)
        khmon_xadd(KHMON_X_HIST | base | (status == ok) << 16 | (bpf_log2l(ns) & 63), 0);
}

/* A record about (mm, addr) did not fit the ring buffer. */
static __always_inline void khmon_lost_at(u64 mm, u64 addr)
{
    struct khmon_lost_key k = {.mm = mm, .addr = addr};
    u64 one = 1;
    u64 *n = lost_at.lookup(&k);

    if (n)
        __sync_fetch_and_add(n, 1);
    else
        lost_at.update(&k, &one);
}

/* Wakeups of the reader. It drains on a timer, so a record wakes it only every
 * KHMON_WAKE_EVERY records a CPU has sent, early enough that a burst never waits for the
 * timer to find the buffer full. The default (adaptive) wakeup fires whenever the reader has
 * caught up, nearly once a record at khugepaged's pace, and each is an irq_work and a task
 * wakeup on the traced CPU: khugepaged's. */
#define KHMON_WAKE_EVERY 64
static __always_inline u64 khmon_rb_flags(void)
{
    u32 zero = 0;
    u64 *n = sent.lookup(&zero);

    if (!n)
        return 0;
    return (++*n & (KHMON_WAKE_EVERY - 1)) ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP;
}

/* Report n repeats of the payload installed in slot idx (set * KHMON_WAYS + way) of this
 * CPU's table. */
static __always_inline void khmon_flush(u32 ev, u32 idx, u64 n)
{
    struct khmon_hdr f = {};

    f.ts = bpf_ktime_get_ns();
    f.count = n;
    f.event = ev;
    f.cpu = bpf_get_smp_processor_id();
    f.flags = DEDUP_FLUSH | idx;
    khmon_add(ev, n, 0);
    if (events.ringbuf_output(&f, sizeof(f), khmon_rb_flags()) != 0)
        khmon_add(ev, n, 1);
}

/* Fill the header. Owner: mm->owner (CONFIG_MEMCG) is the task the mm belongs to; its tgid
 * and comm name the process whose memory is collapsed, whoever does the collapsing. */
static __always_inline void khmon_fill_hdr(struct khmon_hdr *h, u16 ev, u64 mm)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();

    h->ts = bpf_ktime_get_ns();
    h->count = 1;
    h->event = ev;
    h->cpu = bpf_get_smp_processor_id();
    h->tid = (u32)pid_tgid;
    h->tgid = pid_tgid >> 32;
    bpf_get_current_comm(h->comm, sizeof(h->comm));
#if HAVE_OWNER
    if (mm) {
        u64 owner = 0;
        bpf_probe_read_kernel(&owner, sizeof(owner), (void *)(mm + MM_OWNER_OFF));
        if (owner) {
            bpf_probe_read_kernel(&h->owner_tgid, sizeof(h->owner_tgid),
                                  (void *)(owner + TASK_TGID_OFF));
            bpf_probe_read_kernel(h->owner_comm, sizeof(h->owner_comm),
                                  (void *)(owner + TASK_COMM_OFF));
        }
    }
#endif
}

/* -p PID: keep events whose mm belongs to PID, or whose collapsing thread is in PID
 * (MADV_COLLAPSE). Events without an mm (isolate) are kept and attributed in user space. */
static __always_inline int khmon_excluded(struct khmon_hdr *h, u64 mm)
{
    if (FILTER_TGID == 0 || mm == 0 || !HAVE_OWNER)
        return 0;
    return h->owner_tgid != FILTER_TGID && h->tgid != FILTER_TGID;
}

/* Look payload hash h up in its set. A repeat is counted (the hot path): KHMON_REPEAT.
 * Otherwise KHMON_INSTALL, with *way the slot to install the payload into (an empty one, else
 * one not hit since user space last advanced the epoch; its repeats are flushed first), or
 * KHMON_SEND when every way holds a payload hit this epoch: then the event is sent alone and
 * the set keeps its payloads (a set with more busy payloads than ways would otherwise evict
 * one on every event, a flush and an install record each time). */
#define KHMON_REPEAT 0
#define KHMON_INSTALL 1
#define KHMON_SEND 2
static __always_inline int khmon_repeat(struct khmon_set *st, u32 set, u64 h, u64 ep, u32 ev,
                                        u32 *way)
{
    u32 i = 0;

#pragma unroll
    for (u32 j = 0; j < KHMON_WAYS; j++)
        if (st->w[j].fp == h)
            i = j + 1;
    if (i) {
        struct khmon_slot *s = &st->w[(i - 1) & (KHMON_WAYS - 1)];
        u64 ec = s->ec;

        /* A plain increment is exact: the table is this CPU's and a program runs to
         * completion on it. */
        if ((ec >> KHMON_EPOCH_SHIFT) == ep && (ec & 0xffffffffULL) < KHMON_COUNT_MAX) {
            s->ec = ec + 1;
            return KHMON_REPEAT;
        }
        /* First repeat since user space advanced the epoch: report it and those before
         * it, so counts stay live while the payload keeps its slot. */
        s->ec = (ep << KHMON_EPOCH_SHIFT) | (ec & KHMON_EXCLUDED);
        if (!(ec & KHMON_EXCLUDED))
            khmon_flush(ev, set * KHMON_WAYS + ((i - 1) & (KHMON_WAYS - 1)),
                        (ec & 0xffffffffULL) + 1);
        return KHMON_REPEAT;
    }
    i = KHMON_WAYS;
#pragma unroll
    for (u32 j = 0; j < KHMON_WAYS; j++)
        if ((st->w[j].ec >> KHMON_EPOCH_SHIFT) != ep)
            i = j;
#pragma unroll
    for (u32 j = 0; j < KHMON_WAYS; j++)
        if (!st->w[j].fp)
            i = j;
    if (i >= KHMON_WAYS)
        return KHMON_SEND;
    struct khmon_slot *s = &st->w[i & (KHMON_WAYS - 1)];
    u64 ec = s->ec;
    if (s->fp && !(ec & KHMON_EXCLUDED) && (ec & 0xffffffffULL))
        khmon_flush(ev, set * KHMON_WAYS + i, ec & 0xffffffffULL);
    s->fp = 0;
    s->ec = 0;
    *way = i & (KHMON_WAYS - 1);
    return KHMON_INSTALL;
}

EVENT_CODE

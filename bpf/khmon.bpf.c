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
 * Scan events (once per PMD scanned; over a million a second at full speed) are
 * deduplicated here: the first occurrence of a (thread, payload) pair is sent, repeats only
 * bump `repeats` in the dedup map, which user space drains as counted records. Every other
 * probe hit is counted in `seen` (user space adds the repeats), every record the ring buffer
 * refused in `lost`, every payload the full dedup map could not hold in `dedup_full`:
 * nothing is dropped uncounted.
 *
 * Placeholders filled at load time by khmon/bpfgen.py:
 *   NR_EVENTS, RINGBUF_PAGES, DEDUP_ENTRIES, FILTER_TGID (0: all), HAVE_OWNER,
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
BPF_PERCPU_ARRAY(seen, u64, NR_EVENTS);
BPF_PERCPU_ARRAY(lost, u64, NR_EVENTS);
BPF_PERCPU_ARRAY(dedup_full, u64, NR_EVENTS);

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

EVENT_CODE

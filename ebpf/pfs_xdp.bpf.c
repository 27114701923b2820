// SPDX-License-Identifier: MIT OR Apache-2.0
//
// PacketFS XDP steering program.
//
// UDP/IPv4 packets whose destination port is in `ports` go to the AF_XDP socket bound
// to the receiving queue (`xsks`, keyed by rx queue index); everything else (ARP, ICMP,
// IPv6, other ports, IPv4 fragments after the first) is passed to the kernel stack.
// `fault` drops N per million of the steered packets, for loss tests (0 by default).
// `stats` counts each decision per CPU.
//
// Two entry points share the code: `pfs_xdp` for frames in one buffer, and
// `pfs_xdp_frags` (section `xdp.frags`) for multi-buffer frames, which lifts the
// MTU cap that a single-buffer program puts on drivers such as veth (3506 bytes).
// The headers a decision needs always sit in the first buffer.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// Counter slots of `stats`; the user-space side reads them by these indexes.
enum pfs_stat {
	PFS_STEERED = 0,   // redirected to an AF_XDP socket
	PFS_PASSED = 1,    // handed to the kernel stack
	PFS_INJECTED = 2,  // dropped by the fault-injection setting
	PFS_NO_SOCKET = 3, // for our port, but no socket on this queue: dropped
	PFS_STAT_COUNT = 4,
};

struct pfs_fault {
	__u32 drop_per_million;
};

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

// Destination UDP ports (host byte order) to steer; the value is unused.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u16);
	__type(value, __u8);
} ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pfs_fault);
} fault SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PFS_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 slot)
{
	__u64 *c = bpf_map_lookup_elem(&stats, &slot);
	if (c)
		*c += 1;
}

static __always_inline int pass(void)
{
	count(PFS_PASSED);
	return XDP_PASS;
}

static __always_inline int steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return pass();
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl < 5 ||
	    ip->protocol != IPPROTO_UDP)
		return pass();
	// A fragment other than the first carries no UDP header.
	if (ip->frag_off & bpf_htons(0x1fff))
		return pass();
	struct udphdr *udp = (void *)ip + ip->ihl * 4;
	if ((void *)(udp + 1) > end)
		return pass();
	__u16 port = bpf_ntohs(udp->dest);
	if (!bpf_map_lookup_elem(&ports, &port))
		return pass();

	__u32 zero = 0;
	struct pfs_fault *f = bpf_map_lookup_elem(&fault, &zero);
	if (f && f->drop_per_million &&
	    bpf_get_prandom_u32() % 1000000 < f->drop_per_million) {
		count(PFS_INJECTED);
		return XDP_DROP;
	}
	__u32 queue = ctx->rx_queue_index;
	if (!bpf_map_lookup_elem(&xsks, &queue)) {
		count(PFS_NO_SOCKET);
		return XDP_DROP;
	}
	count(PFS_STEERED);
	return bpf_redirect_map(&xsks, queue, XDP_DROP);
}

SEC("xdp")
int pfs_xdp(struct xdp_md *ctx)
{
	return steer(ctx);
}

SEC("xdp.frags")
int pfs_xdp_frags(struct xdp_md *ctx)
{
	return steer(ctx);
}

// No GPL-only helper is used, so the program carries the project's own licence.
char LICENSE[] SEC("license") = "MIT OR Apache-2.0";

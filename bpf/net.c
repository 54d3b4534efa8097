/* zonewatch net channel: every zone's traffic on its host tap, as flows and DNS queries.
 *
 * Two tc programs share one handler: zw_net_zone_tx where the guest's frames enter the host
 * (the tap's tc ingress) and zw_net_zone_rx where frames towards the guest are seen (the
 * tap's tc egress; on a tap whose owner holds only an `ingress` qdisc, as Kata's, the ingress
 * of the device whose filters redirect to the tap). Both only observe: they always return
 * TC_ACT_UNSPEC, so the filters after ours (an owner's mirred redirect) still run and decide
 * the frame's fate.
 *
 * The device's (network namespace, ifindex) names the zone and its slot in the per-CPU
 * `counters` array (zone_ifs, filled by user space): every Kata pod's tap is `tap0_kata`
 * with the same ifindex, in its own namespace. The namespace is a constant of the program
 * instance: user space loads one instance per namespace it attaches in, patching
 * ZW_NETNS_UNPATCHED (netns_id()) to the namespace's inode number. (bpf_get_netns_cookie(skb)
 * cannot tell: it names the namespace of the skb's socket when there is one, and a frame a
 * host process sends to a pod still carries the host's socket on the pod's eth0.) One hash
 * lookup per frame, and any other device costs only that.
 * Every frame is guest-controlled: headers are read (load_hdr) at offsets checked against
 * the frame and the IP lengths, and whatever contradicts itself is counted per zone
 * (malformed, truncated, fragments, other) and not parsed further, so it can neither crash
 * nor skew another zone's counts.
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>
#include "zonewatch.h"

#ifndef ZW_MAX_ZONE_IFS
#define ZW_MAX_ZONE_IFS 4096
#endif
#ifndef ZW_MAX_FLOWS
#define ZW_MAX_FLOWS 65536
#endif
#ifndef ZW_RINGBUF_PAGES
#define ZW_RINGBUF_PAGES 64
#endif
/* Headers starting below this offset are read in place when the linear part holds them. */
#define ZW_DIRECT_MAX 256
/* IPv6 extension headers walked before giving up (counted as `other`). */
#define ZW_IPV6_EXT_MAX 6

/* Not in the UAPI headers (net/ip.h is kernel-internal). */
#define ZW_IP_MF 0x2000
#define ZW_IP_OFFSET 0x1fff
#define ZW_TCP_FIN 0x01
#define ZW_TCP_SYN 0x02
#define ZW_TCP_RST 0x04
#define ZW_TCP_ACK 0x10
#define ZW_DNS_PORT 53
#define ZW_DNS_HDR_LEN 12

BPF_HASH(zone_ifs, struct zw_net_if_key, struct zw_net_if, ZW_MAX_ZONE_IFS);  /* device -> */
BPF_TABLE("lru_hash", struct zw_flow_key, struct zw_flow_stats, flows, ZW_MAX_FLOWS);
/* An array, not a hash keyed by zone: the kernel inlines its lookup (no call, no hash). */
BPF_PERCPU_ARRAY(counters, struct zw_net_counters, ZW_MAX_ZONE_IFS);  /* slot -> */
BPF_PERCPU_ARRAY(scratch, struct zw_net_event, 1);
BPF_PERCPU_ARRAY(lost, u64, ZW_CLOST_NSOURCES);
BPF_RINGBUF_OUTPUT(events, ZW_RINGBUF_PAGES);

static __always_inline void count_lost(int source)
{
	u64 *n = lost.lookup(&source);
	if (n)
		(*n)++;
}

/* A header's bytes at `off`: read in place when the frame's linear part holds them (the
 * usual case: a tap's frames arrive linear), else copied by bpf_skb_load_bytes. `len` is
 * a constant at every call. Returns 0, or < 0 past the end of the frame. */
static __always_inline int load_hdr(struct __sk_buff *skb, u32 off, void *to, u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	/* The bound gives the verifier a range for the packet pointer; deeper headers (long
	 * IPv6 extension chains) take the helper. */
	if (off < ZW_DIRECT_MAX) {
		u8 *at = data + off;
		if ((void *)(at + len) <= end) {
			__builtin_memcpy(to, at, len);
			return 0;
		}
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

/* Where parsing got to: the L4 header's offset and the bytes the IP header says follow. */
struct parsed {
	u32 l3_len;   /* IP datagram bytes (headers included) */
	u32 l4_off;   /* offset of the L4 header in the frame */
	u32 l4_len;   /* bytes from the L4 header to the end of the datagram */
};

/* Emit a record about `key`'s flow; the flow's totals are copied as they are now. */
static __always_inline void emit(u32 op, u32 dir, struct zw_flow_key *key,
				 struct zw_flow_stats *flow, struct __sk_buff *skb,
				 u32 dns_off, u32 dns_len)
{
	int zero = 0;
	struct zw_net_event *e = scratch.lookup(&zero);
	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	e->hdr.type = ZW_REC_NET;
	e->hdr.size = sizeof(*e);
	e->hdr.zone_key = key->zone_key;
	e->hdr.ts_ns = bpf_ktime_get_ns();
	e->op = op;
	e->dir = dir;
	__builtin_memcpy(&e->key, key, sizeof(*key));
	__builtin_memcpy(&e->flow, flow, sizeof(*flow));
	if (dns_len > ZW_DNS_MAX - 1)
		dns_len = ZW_DNS_MAX - 1;
	/* The mask is a no-op after the clamp, but clang folds the clamp into a form the
	 * verifier cannot follow; in asm it stays, and bounds the length where it is used. */
	u64 n = dns_len;
	asm volatile("%[n] &= %[mask]" : [n] "+r"(n) : [mask] "i"(ZW_DNS_MAX - 1));
	if (n > 0 && bpf_skb_load_bytes(skb, dns_off, e->dns, n) == 0)
		e->dns_len = n;
	if (events.ringbuf_output(e, sizeof(*e), 0) != 0)
		count_lost(ZW_CLOST_RINGBUF);
}

/* IPv4: fills the key's addresses and `p`; returns 0, or the counter to bump. */
enum verdict { ZW_OK = 0, ZW_MALFORMED, ZW_TRUNCATED, ZW_FRAGMENT, ZW_OTHER };

static __always_inline int parse_ipv4(struct __sk_buff *skb, u32 off, struct zw_flow_key *key,
				      struct parsed *p)
{
	struct iphdr ip;
	if (load_hdr(skb, off, &ip, sizeof(ip)) < 0)
		return ZW_TRUNCATED;
	if (ip.version != 4 || ip.ihl < 5)
		return ZW_MALFORMED;
	u32 ihl = ip.ihl * 4;
	u32 total = bpf_ntohs(ip.tot_len);
	if (total < ihl)
		return ZW_MALFORMED;
	if (off + total > skb->len)
		return ZW_TRUNCATED;
	if (bpf_ntohs(ip.frag_off) & (ZW_IP_MF | ZW_IP_OFFSET))
		return ZW_FRAGMENT;
	key->family = 4;
	key->proto = ip.protocol;
	__builtin_memcpy(key->local_ip, &ip.saddr, 4);
	__builtin_memcpy(key->remote_ip, &ip.daddr, 4);
	p->l3_len = total;
	p->l4_off = off + ihl;
	p->l4_len = total - ihl;
	return ZW_OK;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, u32 off, struct zw_flow_key *key,
				      struct parsed *p)
{
	struct ipv6hdr ip6;
	if (load_hdr(skb, off, &ip6, sizeof(ip6)) < 0)
		return ZW_TRUNCATED;
	if (ip6.version != 6)
		return ZW_MALFORMED;
	u32 payload = bpf_ntohs(ip6.payload_len);
	u32 end = off + sizeof(ip6) + payload;  /* jumbograms (payload 0) have no L4 here */
	if (end > skb->len)
		return ZW_TRUNCATED;
	u32 l4 = off + sizeof(ip6);
	u8 nh = ip6.nexthdr;
	int i;
#pragma unroll
	for (i = 0; i < ZW_IPV6_EXT_MAX; i++) {
		if (nh == IPPROTO_FRAGMENT)
			return ZW_FRAGMENT;
		if (nh != IPPROTO_HOPOPTS && nh != IPPROTO_ROUTING && nh != IPPROTO_DSTOPTS &&
		    nh != IPPROTO_AH)
			break;
		u8 ext[2];
		if (l4 + sizeof(ext) > end)
			return ZW_MALFORMED;
		if (load_hdr(skb, l4, ext, sizeof(ext)) < 0)
			return ZW_TRUNCATED;
		nh = ext[0];
		/* AH counts its length in 4-byte units minus 2, the others in 8-byte units
		 * minus 1 (RFC 4302, RFC 8200). */
		l4 += nh == IPPROTO_AH ? ((u32)ext[1] + 2) * 4 : ((u32)ext[1] + 1) * 8;
		if (l4 > end)
			return ZW_MALFORMED;
	}
	if (nh == IPPROTO_FRAGMENT)
		return ZW_FRAGMENT;
	if (nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS ||
	    nh == IPPROTO_AH)
		return ZW_OTHER;
	key->family = 6;
	key->proto = nh;
	__builtin_memcpy(key->local_ip, &ip6.saddr, 16);
	__builtin_memcpy(key->remote_ip, &ip6.daddr, 16);
	p->l3_len = sizeof(ip6) + payload;
	p->l4_off = l4;
	p->l4_len = end - l4;
	return ZW_OK;
}

static __always_inline void bump(struct zw_net_counters *c, int verdict)
{
	if (verdict == ZW_MALFORMED)
		c->malformed++;
	else if (verdict == ZW_TRUNCATED)
		c->truncated++;
	else if (verdict == ZW_FRAGMENT)
		c->fragments++;
	else
		c->other++;
}

/* The network namespace this program instance is attached in: a 64-bit immediate (one
 * ld_imm64 instruction, kept from constant folding by the asm) that user space patches. */
static __always_inline u64 netns_id(void)
{
	u64 id;
	asm volatile("%0 = %1 ll" : "=r"(id) : "i"(ZW_NETNS_UNPATCHED));
	return id;
}

/* One frame of a zone's traffic; `dir` is enum zw_net_dir. Counts, never decides: the
 * caller returns TC_ACT_UNSPEC whatever happens here. */
static __always_inline void observe(struct __sk_buff *skb, u32 dir)
{
	struct zw_net_if_key dev = {.netns = netns_id(), .ifindex = skb->ifindex};
	struct zw_net_if *tap = zone_ifs.lookup(&dev);
	if (!tap)
		return;
	u32 zone_key = tap->zone_key;
	u32 slot = tap->slot;
	u32 ifindex = tap->tap_ifindex;  /* flows name the tap, also when seen on its peer */
	u32 d = dir - 1;  /* index of the [2] arrays */
	if (d > 1)
		return;

	struct zw_net_counters *c = counters.lookup(&slot);
	if (!c) {  /* a slot past the array: user space never hands one out */
		count_lost(ZW_CLOST_MAP_FULL);
		return;
	}
	/* Per-CPU: no other CPU writes this copy. */
	c->bytes[d] += skb->len;
	c->packets[d]++;

	u16 eth_proto;
	if (load_hdr(skb, offsetof(struct ethhdr, h_proto), &eth_proto, 2) < 0) {
		c->truncated++;
		return;
	}
	struct zw_flow_key key = {};
	struct parsed p = {};
	int verdict;
	if (eth_proto == bpf_htons(ETH_P_IP))
		verdict = parse_ipv4(skb, ETH_HLEN, &key, &p);
	else if (eth_proto == bpf_htons(ETH_P_IPV6))
		verdict = parse_ipv6(skb, ETH_HLEN, &key, &p);
	else
		verdict = ZW_OTHER;
	if (verdict != ZW_OK) {
		bump(c, verdict);
		return;
	}

	u16 src_port = 0, dst_port = 0;
	u64 tcp_flags = 0;
	u32 payload = p.l4_len;  /* other protocols: everything after the IP headers */
	u16 icmp_local = 0, icmp_remote = 0;
	int icmp_flow = 0;
	u32 dns_off = 0, dns_len = 0;
	if (key.proto == IPPROTO_TCP) {
		struct tcphdr tcp;
		if (p.l4_len < sizeof(tcp)) {
			c->truncated++;
			return;
		}
		if (load_hdr(skb, p.l4_off, &tcp, sizeof(tcp)) < 0) {
			c->truncated++;
			return;
		}
		u32 doff = tcp.doff * 4;
		if (doff < sizeof(tcp) || doff > p.l4_len) {
			c->malformed++;
			return;
		}
		src_port = bpf_ntohs(tcp.source);
		dst_port = bpf_ntohs(tcp.dest);
		tcp_flags = ((u8 *)&tcp)[13];  /* the flag byte after data offset */
		payload = p.l4_len - doff;
	} else if (key.proto == IPPROTO_UDP) {
		struct udphdr udp;
		if (p.l4_len < sizeof(udp)) {
			c->truncated++;
			return;
		}
		if (load_hdr(skb, p.l4_off, &udp, sizeof(udp)) < 0) {
			c->truncated++;
			return;
		}
		u32 ulen = bpf_ntohs(udp.len);
		if (ulen < sizeof(udp) || ulen > p.l4_len) {
			c->malformed++;
			return;
		}
		src_port = bpf_ntohs(udp.source);
		dst_port = bpf_ntohs(udp.dest);
		payload = ulen - sizeof(udp);
		if (dst_port == ZW_DNS_PORT && payload >= ZW_DNS_HDR_LEN) {
			u8 flags;
			/* QR (the top bit of byte 2) clear: a query, not an answer. */
			if (load_hdr(skb, p.l4_off + sizeof(udp) + 2, &flags, 1) == 0 &&
			    !(flags & 0x80)) {
				dns_off = p.l4_off + sizeof(udp);
				dns_len = payload;
			}
		}
	} else if (key.proto == IPPROTO_ICMP || key.proto == IPPROTO_ICMPV6) {
		u8 icmp[6];  /* type, code, checksum, identifier */
		if (p.l4_len < 8) {
			c->truncated++;
			return;
		}
		if (load_hdr(skb, p.l4_off, icmp, sizeof(icmp)) < 0) {
			c->truncated++;
			return;
		}
		u8 type = icmp[0];
		int echo = key.proto == IPPROTO_ICMP ? (type == 8 || type == 0)
						      : (type == 128 || type == 129);
		/* Echo request and reply are one flow per identifier; any other message is
		 * keyed by its type and code. */
		icmp_flow = 1;
		if (echo)
			icmp_local = ((u16)icmp[4] << 8) | icmp[5];
		else
			icmp_remote = ((u16)type << 8) | icmp[1];
		payload = p.l4_len - 8;
	}

	/* Orient the key from the zone's side: local is the zone's end. */
	if (dir == ZW_NET_EGRESS) {
		key.local_port = src_port;
		key.remote_port = dst_port;
	} else {
		u8 tmp[16];
		__builtin_memcpy(tmp, key.local_ip, 16);
		__builtin_memcpy(key.local_ip, key.remote_ip, 16);
		__builtin_memcpy(key.remote_ip, tmp, 16);
		key.local_port = dst_port;
		key.remote_port = src_port;
	}
	if (icmp_flow) {
		key.local_port = icmp_local;
		key.remote_port = icmp_remote;
	}
	key.zone_key = zone_key;

	struct zw_flow_stats *f = flows.lookup(&key);
	if (f && (f->state & ZW_FLOW_ENDED) && (tcp_flags & (ZW_TCP_SYN | ZW_TCP_ACK)) == ZW_TCP_SYN) {
		/* A new connection on the tuple of one that ended: a new flow. */
		flows.delete(&key);
		f = 0;
	}
	int fresh = 0;
	if (!f) {
		struct zw_flow_stats init = {};
		init.first_ns = init.last_ns = bpf_ktime_get_ns();
		init.ifindex = ifindex;
		init.initiator = dir;
		fresh = flows.insert(&key, &init) == 0;  /* another CPU may have won the race */
		f = flows.lookup(&key);
		if (!f) {
			count_lost(ZW_CLOST_MAP_FULL);
			return;
		}
	} else {
		/* The last tick's time, not a clock read (which cost ~60 ns of the ~260 per frame
		 * on the project's nested-virt machines): last_ns only tells idle flows (seconds)
		 * and durations, to a tick. It may lag first_ns by up to a tick: it only moves on. */
		u64 now = bpf_ktime_get_coarse_ns();
		if (now > f->last_ns)
			f->last_ns = now;
	}
	__sync_fetch_and_add(&f->bytes[d], p.l3_len);
	__sync_fetch_and_add(&f->packets[d], 1);
	__sync_fetch_and_add(&f->payload[d], payload);
	if (fresh) {
		c->new_flows++;
		emit(ZW_NET_FLOW_START, dir, &key, f, skb, 0, 0);
	}
	if (dns_len) {
		c->dns_queries++;
		emit(ZW_NET_DNS, dir, &key, f, skb, dns_off, dns_len);
	}
	if (key.proto == IPPROTO_TCP && tcp_flags) {
		if ((f->tcp_flags | tcp_flags) != f->tcp_flags)
			__sync_fetch_and_or(&f->tcp_flags, tcp_flags);
		u64 bits = 0;
		if (tcp_flags & ZW_TCP_FIN)
			bits |= dir == ZW_NET_EGRESS ? ZW_FLOW_FIN_EGRESS : ZW_FLOW_FIN_INGRESS;
		if (bits && !(f->state & bits))
			__sync_fetch_and_or(&f->state, bits);
		u64 state = f->state;
		int done = (tcp_flags & ZW_TCP_RST) ||
			   (state & (ZW_FLOW_FIN_EGRESS | ZW_FLOW_FIN_INGRESS)) ==
				   (ZW_FLOW_FIN_EGRESS | ZW_FLOW_FIN_INGRESS);
		/* Exactly one CPU sends the end: the one that sets ZW_FLOW_ENDED. */
		if (done && !(state & ZW_FLOW_ENDED) &&
		    !(__sync_fetch_and_or(&f->state, ZW_FLOW_ENDED) & ZW_FLOW_ENDED))
			emit(ZW_NET_FLOW_END, dir, &key, f, skb, 0, 0);
	}
}

int zw_net_zone_tx(struct __sk_buff *skb)
{
	observe(skb, ZW_NET_EGRESS);
	return TC_ACT_UNSPEC;  /* the next filter (or the default) decides, as without us */
}

int zw_net_zone_rx(struct __sk_buff *skb)
{
	observe(skb, ZW_NET_INGRESS);
	return TC_ACT_UNSPEC;
}

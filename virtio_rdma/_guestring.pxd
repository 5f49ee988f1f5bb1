# The guest-ring accessors every native path of the device uses (virtio_rdma._datapath,
# virtio_rdma._accel): little-endian loads and stores into guest memory, the acquire
# load of a doorbell record, the one-time snapshot of a guest slot, and the CQE write
# with its owner byte last, in release order (docs/virtio-rdma.md 5.x.6.6). One
# definition, inlined into each module that cimports it.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #ifndef VRDMA_GUESTRING_H
    #define VRDMA_GUESTRING_H
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    #define GR_LE16(x) __builtin_bswap16(x)
    #define GR_LE32(x) __builtin_bswap32(x)
    #define GR_LE64(x) __builtin_bswap64(x)
    #else
    #define GR_LE16(x) (x)
    #define GR_LE32(x) (x)
    #define GR_LE64(x) (x)
    #endif
    static inline uint16_t gr_ld16(const char *p) { uint16_t v; memcpy(&v, p, 2); return GR_LE16(v); }
    static inline uint32_t gr_ld32(const char *p) { uint32_t v; memcpy(&v, p, 4); return GR_LE32(v); }
    static inline uint64_t gr_ld64(const char *p) { uint64_t v; memcpy(&v, p, 8); return GR_LE64(v); }
    static inline uint32_t gr_ld32_acq(const char *p) {
        return GR_LE32(__atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE)); }
    static inline void gr_st32(char *p, uint32_t v) { v = GR_LE32(v); memcpy(p, &v, 4); }
    static inline void gr_st64(char *p, uint64_t v) { v = GR_LE64(v); memcpy(p, &v, 8); }
    /* Snapshot guest bytes once: later checks work on the copy, never on
       memory the guest can change under us. */
    static inline void gr_snapshot(void *dst, const char *src, size_t n) {
        memcpy(dst, src, n);
        __asm__ __volatile__("" ::: "memory");
    }
    /* CQE body around the old owner byte, then the owner byte with release order. */
    static inline void gr_write_cqe(char *e, uint64_t wr_id, uint8_t status, uint8_t opcode,
                                    uint8_t flags, uint32_t byte_len, uint32_t imm, uint32_t qpn,
                                    uint32_t src_qp, uint32_t vendor_err, uint8_t owner) {
        gr_st64(e, wr_id);
        e[8] = (char)status; e[9] = (char)opcode; e[10] = (char)flags;
        gr_st32(e + 12, byte_len); gr_st32(e + 16, imm); gr_st32(e + 20, qpn);
        gr_st32(e + 24, src_qp); gr_st32(e + 28, vendor_err);
        __atomic_store_n((uint8_t *)(e + 11), owner, __ATOMIC_RELEASE);
    }
    #endif
    """
    uint16_t gr_ld16(const char *p) noexcept nogil
    uint32_t gr_ld32(const char *p) noexcept nogil
    uint64_t gr_ld64(const char *p) noexcept nogil
    uint32_t gr_ld32_acq(const char *p) noexcept nogil
    void gr_st32(char *p, uint32_t v) noexcept nogil
    void gr_st64(char *p, uint64_t v) noexcept nogil
    void gr_snapshot(void *dst, const char *src, size_t n) noexcept nogil
    void gr_write_cqe(char *e, uint64_t wr_id, uint8_t status, uint8_t opcode, uint8_t flags,
                      uint32_t byte_len, uint32_t imm, uint32_t qpn, uint32_t src_qp,
                      uint32_t vendor_err, uint8_t owner) noexcept nogil

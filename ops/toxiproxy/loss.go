package main

import (
	"math"
	"math/rand"
	"time"

	"github.com/Shopify/toxiproxy/v2/stream"
	"github.com/Shopify/toxiproxy/v2/toxics"
)

// SegmentBytes is the TCP payload of one segment on a 1500-byte Ethernet path (MSS 1460): a chunk of n bytes
// crosses the link as ceil(n/SegmentBytes) segments, each lost on its own.
const SegmentBytes = 1460

// MaxHeld bounds the chunks queued behind a lost one (a receive window): past it the toxic stops reading, so the
// sender is held back as a real window would hold it.
const MaxHeld = 1024

// LossToxic models packet loss on a TCP path. Toxiproxy proxies a byte stream, so a lost segment is never lost
// data: TCP retransmits it, and everything behind it waits (head-of-line blocking). Each segment of a chunk is
// lost with probability Percent/100; the chunk is split there, the bytes before the lost segment pass at once,
// the rest is held until the retransmission arrives:
//
//   - after RTT ms when more data follows the loss while it is held (fast retransmit: the segments behind the
//     gap make the receiver acknowledge duplicates or SACK, and the sender resends about one round trip later);
//   - after RTO ms when nothing follows (a tail loss: only the retransmission timer recovers it; Linux's RTO is
//     SRTT + max(4 RTTVAR, 200 ms), so at least 200 ms);
//   - a retransmission is itself lost with the same probability, and each further attempt waits twice the
//     previous timeout (exponential backoff).
//
// Data queued behind a held segment is released right after it, in order, with its own timestamp: those bytes
// crossed the link meanwhile and only waited in the receiver's buffer, so a latency toxic later in the chain
// does not delay them again; the retransmitted bytes carry the time they were held, and are delayed as usual.
type LossToxic struct {
	Percent float64 `json:"percent"`
	RTT     int64   `json:"rtt"`
	RTO     int64   `json:"rto"`

	random func() float64
	after  func(time.Duration) <-chan time.Time
}

// GetBufferSize lets the sender run ahead of a held segment, as a TCP window does.
func (t *LossToxic) GetBufferSize() int {
	return MaxHeld
}

func (t *LossToxic) roll() float64 {
	if t.random != nil {
		return t.random()
	}
	return rand.Float64() // #nosec G404 -- simulated loss, not security
}

func (t *LossToxic) timer(d time.Duration) <-chan time.Time {
	if t.after != nil {
		return t.after(d)
	}
	return time.After(d)
}

// lost tells whether one segment is lost.
func (t *LossToxic) lost() bool {
	return t.Percent > 0 && t.roll()*100 < t.Percent
}

// LostAt is the byte offset of the first lost segment of a chunk of n bytes, or -1 when every segment arrives.
func (t *LossToxic) LostAt(n int) int {
	for offset := 0; offset < n; offset += SegmentBytes {
		if t.lost() {
			return offset
		}
	}
	return -1
}

// Backoff is how long a segment is held on its attempt-th loss (1: the first): one RTT for a fast retransmit,
// else the RTO doubled for each earlier lost retransmission.
func (t *LossToxic) Backoff(attempt int, fast bool) time.Duration {
	if attempt == 1 && fast {
		return time.Duration(t.RTT) * time.Millisecond
	}
	shift := math.Min(float64(attempt-1), 6)
	return time.Duration(t.RTO) * time.Millisecond << int(shift)
}

// Pipe passes every chunk on in order, holding those behind a lost segment until it is retransmitted.
func (t *LossToxic) Pipe(stub *toxics.ToxicStub) {
	var queue []*stream.StreamChunk
	closing := false
	for {
		var c *stream.StreamChunk
		if len(queue) > 0 {
			c, queue = queue[0], queue[1:]
		} else if closing {
			stub.Close()
			return
		} else {
			select {
			case <-stub.Interrupt:
				return
			case c = <-stub.Input:
				if c == nil {
					stub.Close()
					return
				}
			}
		}
		at := t.LostAt(len(c.Data))
		if at < 0 {
			stub.Output <- c
			continue
		}
		if at > 0 {
			stub.Output <- &stream.StreamChunk{Data: c.Data[:at], Timestamp: c.Timestamp}
			c = &stream.StreamChunk{Data: c.Data[at:], Timestamp: c.Timestamp}
		}
		var interrupted bool
		queue, closing, interrupted = t.hold(stub, c, queue, closing)
		if interrupted {
			for _, rest := range queue {
				stub.Output <- rest
			}
			return
		}
	}
}

// hold keeps c until its retransmission arrives, queueing what comes in behind it, then passes c on. It returns
// the queue, whether the input ended, and whether the toxic was interrupted (c is passed on then too).
func (t *LossToxic) hold(
	stub *toxics.ToxicStub, c *stream.StreamChunk, queue []*stream.StreamChunk, closing bool,
) ([]*stream.StreamChunk, bool, bool) {
	start := time.Now()
	fast := len(queue) > 0
	for attempt := 1; ; attempt++ {
		wait := t.timer(t.Backoff(attempt, fast))
		for waiting := true; waiting; {
			input := stub.Input
			if closing || len(queue) >= MaxHeld {
				input = nil
			}
			select {
			case <-stub.Interrupt:
				stub.Output <- c
				return queue, closing, true
			case next := <-input:
				if next == nil {
					closing = true
					continue
				}
				queue = append(queue, next)
				if attempt == 1 && !fast {
					fast = true
					if left := t.Backoff(1, false) - time.Since(start); t.Backoff(1, true) < left {
						wait = t.timer(t.Backoff(1, true))
					}
				}
			case <-wait:
				waiting = false
			}
		}
		if !t.lost() {
			break
		}
	}
	c.Timestamp = c.Timestamp.Add(time.Since(start))
	stub.Output <- c
	return queue, closing, false
}

func init() {
	toxics.Register("loss", new(LossToxic))
}

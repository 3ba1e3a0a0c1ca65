package main

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"

	"github.com/Shopify/toxiproxy/v2/stream"
	"github.com/Shopify/toxiproxy/v2/toxics"
)

// timerRequest is one timer the toxic asked for; the test fires it by closing fire.
type timerRequest struct {
	d    time.Duration
	fire chan time.Time
}

// harness runs a LossToxic on a stub with scripted dice and timers the test fires itself: no test waits on the
// wall clock.
type harness struct {
	t      *testing.T
	input  chan *stream.StreamChunk
	output chan *stream.StreamChunk
	timers chan timerRequest
	stub   *toxics.ToxicStub
	done   chan struct{}
}

func newHarness(t *testing.T, percent float64, rolls ...float64) *harness {
	h := &harness{
		t:      t,
		input:  make(chan *stream.StreamChunk, MaxHeld),
		output: make(chan *stream.StreamChunk, 16),
		timers: make(chan timerRequest, 16),
		done:   make(chan struct{}),
	}
	toxic := &LossToxic{Percent: percent, RTT: 80, RTO: 280}
	toxic.random = func() float64 {
		if len(rolls) == 0 {
			return 0.999
		}
		r := rolls[0]
		rolls = rolls[1:]
		return r
	}
	toxic.after = func(d time.Duration) <-chan time.Time {
		req := timerRequest{d, make(chan time.Time)}
		h.timers <- req
		return req.fire
	}
	h.stub = toxics.NewToxicStub(h.input, h.output)
	go func() {
		defer close(h.done)
		h.stub.Run(&toxics.ToxicWrapper{Toxic: toxic, Type: "loss", Toxicity: 1})
	}()
	return h
}

func (h *harness) send(data []byte) {
	h.input <- &stream.StreamChunk{Data: data, Timestamp: time.Now()}
}

func (h *harness) timer() timerRequest {
	h.t.Helper()
	select {
	case req := <-h.timers:
		return req
	case <-time.After(5 * time.Second):
		h.t.Fatal("the toxic asked for no retransmission timer")
	}
	return timerRequest{}
}

func (h *harness) read() []byte {
	h.t.Helper()
	select {
	case c, ok := <-h.output:
		if !ok {
			h.t.Fatal("output closed early")
		}
		return c.Data
	case <-time.After(5 * time.Second):
		h.t.Fatal("nothing came out of the toxic")
	}
	return nil
}

// nothingOut checks no chunk is ready; the toxic holds them until a timer fires, so this is no race.
func (h *harness) nothingOut() {
	h.t.Helper()
	select {
	case c := <-h.output:
		h.t.Fatalf("%d bytes passed a held segment", len(c.Data))
	default:
	}
}

func (h *harness) noTimer() {
	h.t.Helper()
	select {
	case req := <-h.timers:
		h.t.Fatalf("unexpected timer of %v", req.d)
	default:
	}
}

func chunk(n int, fill byte) []byte {
	return bytes.Repeat([]byte{fill}, n)
}

func TestNoLossPassesEveryChunkUnchanged(t *testing.T) {
	h := newHarness(t, 0)
	for i := 0; i < 50; i++ {
		h.send(chunk(3000, byte(i)))
		if got := h.read(); !bytes.Equal(got, chunk(3000, byte(i))) {
			t.Fatalf("chunk %d changed", i)
		}
	}
	h.noTimer()
	close(h.input)
	<-h.done
}

func TestTailLossWaitsForTheRetransmissionTimeout(t *testing.T) {
	// Segment 0 arrives, segment 1 is lost, its retransmission arrives.
	h := newHarness(t, 10, 0.5, 0.05, 0.5)
	data := append(chunk(SegmentBytes, 'a'), chunk(SegmentBytes+100, 'b')...)
	h.send(data)
	if got := h.read(); !bytes.Equal(got, data[:SegmentBytes]) {
		t.Fatalf("the segment before the loss should pass at once, got %d bytes", len(got))
	}
	req := h.timer()
	if req.d != 280*time.Millisecond {
		t.Fatalf("a tail loss waits for the RTO, asked for %v", req.d)
	}
	h.nothingOut()
	close(req.fire)
	if got := h.read(); !bytes.Equal(got, data[SegmentBytes:]) {
		t.Fatalf("the retransmitted bytes should follow, got %d", len(got))
	}
	close(h.input)
	<-h.done
}

func TestDataBehindALossTriggersFastRetransmitAndWaitsInOrder(t *testing.T) {
	h := newHarness(t, 10, 0.01)
	h.send(chunk(100, 'x'))
	if req := h.timer(); req.d != 280*time.Millisecond {
		t.Fatalf("first the RTO, got %v", req.d)
	}
	h.send(chunk(100, 'y'))
	h.send(chunk(100, 'z'))
	fast := h.timer()
	if fast.d != 80*time.Millisecond {
		t.Fatalf("data behind the gap brings a fast retransmit after one RTT, asked for %v", fast.d)
	}
	h.nothingOut()
	close(fast.fire)
	for _, want := range []byte("xyz") {
		if got := h.read(); !bytes.Equal(got, chunk(100, want)) {
			t.Fatalf("expected the %q chunk next, got %q", want, got[:1])
		}
	}
	h.noTimer()
	close(h.input)
	<-h.done
}

func TestLostRetransmissionsBackOffExponentially(t *testing.T) {
	h := newHarness(t, 10, 0.01, 0.01, 0.01)
	h.send(chunk(10, 'r'))
	for _, want := range []time.Duration{280, 560, 1120} {
		req := h.timer()
		if req.d != want*time.Millisecond {
			t.Fatalf("expected a timer of %v ms, got %v", want, req.d)
		}
		h.nothingOut()
		close(req.fire)
	}
	if got := h.read(); !bytes.Equal(got, chunk(10, 'r')) {
		t.Fatal("the chunk should arrive after its third retransmission")
	}
	close(h.input)
	<-h.done
}

func TestEndOfStreamWhileHeldDeliversTheDataThenCloses(t *testing.T) {
	h := newHarness(t, 10, 0.01)
	h.send(chunk(10, 'e'))
	req := h.timer()
	close(h.input)
	close(req.fire)
	if got := h.read(); !bytes.Equal(got, chunk(10, 'e')) {
		t.Fatal("held data must not be dropped at the end of the stream")
	}
	<-h.done
	if _, ok := <-h.output; ok {
		t.Fatal("the output should close after the held data")
	}
}

func TestInterruptWhileHeldPassesEverythingOn(t *testing.T) {
	h := newHarness(t, 10, 0.01)
	h.send(chunk(10, 'i'))
	h.timer()
	h.send(chunk(10, 'j'))
	h.timer()
	if !h.stub.InterruptToxic() {
		t.Fatal("the toxic should take the interrupt")
	}
	<-h.done
	for _, want := range []byte("ij") {
		if got := h.read(); !bytes.Equal(got, chunk(10, want)) {
			t.Fatalf("interrupted, the toxic must pass on %q", want)
		}
	}
}

func TestLostAtCountsSegments(t *testing.T) {
	toxic := &LossToxic{Percent: 50}
	rolls := []float64{0.9, 0.9, 0.1}
	toxic.random = func() float64 { r := rolls[0]; rolls = rolls[1:]; return r }
	if at := toxic.LostAt(3 * SegmentBytes); at != 2*SegmentBytes {
		t.Fatalf("the third segment is lost, got offset %d", at)
	}
	if (&LossToxic{}).LostAt(1<<20) != -1 {
		t.Fatal("0% loss loses nothing")
	}
}

func TestRegisteredWithItsAttributes(t *testing.T) {
	wrapper := &toxics.ToxicWrapper{Type: "loss"}
	if toxics.New(wrapper) == nil {
		t.Fatal("the loss toxic is not registered")
	}
	if err := json.Unmarshal([]byte(`{"percent": 0.5, "rtt": 80, "rto": 280}`), wrapper.Toxic); err != nil {
		t.Fatal(err)
	}
	got := *wrapper.Toxic.(*LossToxic)
	if got.Percent != 0.5 || got.RTT != 80 || got.RTO != 280 || wrapper.BufferSize != MaxHeld {
		t.Fatalf("attributes not decoded: %+v, buffer %d", got, wrapper.BufferSize)
	}
}

//! The node's running vhost-user devices behind the control plane's `DeviceHost`: a vhost-user-blk device per
//! attached volume, a vhost-user-net device per vhost-user port, the latter joined to the switch by two adapters
//! ([`ToSwitch`], [`ToGuest`]) — the wiring between `vhost-backends` and `vnet`, which know nothing of each other.
//! Both take a frame's offloads in `vessel_proto`'s virtio-net header, which passes through here as it is.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use vessel_control::node::{AttachSpec, DeviceHost, NetSpec};
use vessel_proto::virtio_net::VirtioNetHeader;
use vhost_backends::blk::{BlkConfig, BlkDevice};
use vhost_backends::net::{
    NetBackend, NetConfig, NetDevice, NetPort, RxBatch, RxQueue, Taken, TxBatch,
};
use vstore::{LocalVolume, VolumeId};

#[derive(Debug, Default)]
pub struct Devices {
    running: Mutex<HashMap<VolumeId, BlkDevice>>,
    nets: Mutex<HashMap<u64, NetDevice>>,
}

/// What a guest transmits is switched on the queue pair's worker thread, by that pair's sender (each is locked
/// only by its own worker).
struct ToSwitch(Vec<Mutex<vnet::PortSender>>);

impl ToSwitch {
    fn sender(&self, queue_pair: u16) -> Option<std::sync::MutexGuard<'_, vnet::PortSender>> {
        let sender = self.0.get(usize::from(queue_pair))?;
        Some(sender.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl NetPort for ToSwitch {
    fn transmit(&self, queue_pair: u16, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        self.sender(queue_pair)
            .is_some_and(|mut sender| sender.send(header, frame))
    }

    fn transmit_batch(&self, queue_pair: u16, batch: &TxBatch) -> Taken {
        let Some(mut sender) = self.sender(queue_pair) else {
            return Taken::default();
        };
        if sender.send_batch(batch.iter().map(|(header, frame)| (*header, frame))) == 0 {
            return Taken::default();
        }
        let mut taken = Taken::default();
        for (_, frame) in batch.iter() {
            taken.add(frame.len());
        }
        taken
    }

    fn flush(&self, queue_pair: u16) {
        if let Some(mut sender) = self.sender(queue_pair) {
            sender.flush();
        }
    }
}

/// What the switch sends the port goes to one of the device's receive queues: a flow (by its addresses) keeps to
/// one queue pair, among those the guest has open.
struct ToGuest(Arc<NetBackend>);

impl ToGuest {
    /// The receive queue for `frame`: its flow picks one of the open queue pairs.
    fn queue_for(&self, frame: &[u8]) -> Option<(u16, &Arc<RxQueue>)> {
        let pairs = self.0.queue_pairs();
        // Ethertype and the IPv4 addresses, or whatever lies there: enough to spread flows (and
        // not worth hashing for a guest with one pair).
        let first = if pairs <= 1 {
            0
        } else {
            let flow = frame
                .get(12..34)
                .unwrap_or_default()
                .iter()
                .fold(0u32, |hash, byte| {
                    hash.wrapping_mul(31).wrapping_add(u32::from(*byte))
                });
            u16::try_from(flow % u32::from(pairs)).unwrap_or(0)
        };
        (0..pairs).map(|i| (first + i) % pairs).find_map(|pair| {
            self.0
                .rx_queue(pair)
                .filter(|queue| queue.is_open())
                .map(|queue| (pair, queue))
        })
    }
}

impl vnet::FrameSink for ToGuest {
    fn push(&self, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        self.queue_for(frame)
            .is_some_and(|(_, queue)| queue.push(header, frame))
    }

    fn accepts_gso(&self, header: &VirtioNetHeader) -> bool {
        self.0.guest_offloads().accepts_gso(header)
    }

    fn flush(&self) {
        for pair in 0..self.0.queue_pairs() {
            if let Some(queue) = self.0.rx_queue(pair) {
                queue.flush();
            }
        }
    }

    fn run(&self) -> Box<dyn vnet::SinkRun + '_> {
        Box::new(GuestRun {
            guest: self,
            held: None,
        })
    }
}

/// A run of pushes into a guest: holds the receive queue of the last frame's pair (one at a time).
struct GuestRun<'g> {
    guest: &'g ToGuest,
    held: Option<(u16, RxBatch<'g>)>,
}

impl vnet::SinkRun for GuestRun<'_> {
    fn push(&mut self, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        // A guest with one queue pair takes every frame on the pair held (a closed queue refuses it there).
        if let Some((_, batch)) = &mut self.held
            && self.guest.0.queue_pairs() == 1
        {
            return batch.push(header, frame);
        }
        let Some((pair, queue)) = self.guest.queue_for(frame) else {
            return false;
        };
        let batch = match &mut self.held {
            Some((held, batch)) if *held == pair => batch,
            held => {
                *held = None;
                &mut held.insert((pair, queue.batch())).1
            }
        };
        batch.push(header, frame)
    }
}

impl DeviceHost for Devices {
    fn attach(&self, volume: Arc<LocalVolume>, spec: &AttachSpec) -> Result<(), String> {
        let id = volume.layout().id;
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.contains_key(&id) {
            return Err(format!("volume {id} is already served on this node"));
        }
        let config = BlkConfig {
            queues: spec.queues,
            read_only: spec.read_only,
            socket_mode: spec.socket_mode,
            ..BlkConfig::new(PathBuf::from(&spec.socket))
        };
        let device = BlkDevice::start(volume, config).map_err(|error| error.to_string())?;
        running.insert(id, device);
        Ok(())
    }

    fn detach(&self, volume: VolumeId) {
        let device = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&volume);
        if let Some(device) = device {
            device.stop();
        }
    }

    fn resize(&self, volume: VolumeId) -> Result<(), String> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        match running.get(&volume) {
            Some(device) => device.resize().map_err(|error| error.to_string()),
            None => Ok(()),
        }
    }

    fn connected(&self, volume: VolumeId) -> bool {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.get(&volume).is_some_and(BlkDevice::connected)
    }

    fn write_back(&self, volume: VolumeId) -> Option<bool> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.get(&volume).map(BlkDevice::write_back)
    }

    fn start_net(
        &self,
        port: u64,
        spec: &NetSpec,
        senders: Vec<vnet::PortSender>,
    ) -> Result<Arc<dyn vnet::FrameSink>, String> {
        let mut nets = self.nets.lock().unwrap_or_else(PoisonError::into_inner);
        if nets.contains_key(&port) {
            return Err(format!("port {port} is already served on this node"));
        }
        let config = NetConfig {
            queue_pairs: spec.queues,
            mtu: spec.mtu,
            socket_mode: spec.socket_mode,
            ..NetConfig::new(
                format!("port {port}"),
                PathBuf::from(&spec.socket),
                spec.mac,
            )
        };
        let to_switch = ToSwitch(senders.into_iter().map(Mutex::new).collect());
        let device =
            NetDevice::start(config, Arc::new(to_switch)).map_err(|error| error.to_string())?;
        let sink = Arc::new(ToGuest(Arc::clone(device.backend())));
        nets.insert(port, device);
        Ok(sink)
    }

    fn stop_net(&self, port: u64) {
        let device = self
            .nets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&port);
        if let Some(device) = device {
            device.stop();
        }
    }

    fn net_connected(&self, port: u64) -> bool {
        let nets = self.nets.lock().unwrap_or_else(PoisonError::into_inner);
        nets.get(&port).is_some_and(NetDevice::connected)
    }

    fn detach_all(&self) {
        let nets: Vec<NetDevice> = self
            .nets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, device)| device)
            .collect();
        for device in nets {
            device.stop();
        }
        let devices: Vec<BlkDevice> = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, device)| device)
            .collect();
        for device in devices {
            device.stop();
        }
    }
}

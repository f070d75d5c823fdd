//! The node's running vhost-user-blk devices, one per attached volume, behind the control plane's `DeviceHost`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use vessel_control::node::{AttachSpec, DeviceHost};
use vhost_backends::blk::{BlkConfig, BlkDevice};
use vstore::{LocalVolume, VolumeId};

#[derive(Debug, Default)]
pub struct BlkDevices {
    running: Mutex<HashMap<VolumeId, BlkDevice>>,
}

impl DeviceHost for BlkDevices {
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

    fn detach_all(&self) {
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
